#!/usr/bin/env bash
# This machine as a small cluster, to try multi-node launches before a real one (and for tests/multinode):
#   - two host names for this machine, ds-distill-node0 and ds-distill-node1 (lines in /etc/hosts);
#   - an sshd on 127.0.0.1 that takes a key generated here, and an ssh client entry for both names, so
#     `ssh ds-distill-node1 hostname` and DeepSpeed's pdsh runner work without a password;
#   - a DeepSpeed hostfile naming both, one slot each;
#   - munge and a SLURM controller with one node daemon per host name (Debian's slurmd runs several on one host
#     when each has its own port; `status` says how many registered), partition "local".
#
#   sudo bash tools/local_cluster.sh up       # installs what is missing (apt), starts what is not running
#   bash tools/local_cluster.sh status        # what runs, by pid
#   sudo bash tools/local_cluster.sh down     # stops what `up` started (by pid) and removes what it wrote
#
# `up` is idempotent and ends with the lines to export: SLURM_CONF=PATH (for sbatch, squeue, ...) and last
# HOSTFILE=PATH. Settings: CLUSTER_DIR (default /tmp/ds_distill_cluster), SSH_PORT (default 2222),
# SLURM_PORTS (default 6817: the controller's; the node daemons take the next two).
set -euo pipefail
DIR=${CLUSTER_DIR:-/tmp/ds_distill_cluster}
SSH_PORT=${SSH_PORT:-2222}
CTLD_PORT=${SLURM_PORTS:-6817}
NODES=(ds-distill-node0 ds-distill-node1)
HOSTS_MARK="# ds_distill local_cluster"
SSH_CLIENT_CONF=/etc/ssh/ssh_config.d/ds_distill_local_cluster.conf
SLURM_CONF_FILE=$DIR/slurm/slurm.conf

say() { echo "local_cluster: $*" >&2; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
need_root() { [ "$(id -u)" = 0 ] || { say "$1 needs root (run it with sudo)"; exit 2; }; }

install_missing() {
  local missing=()
  command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
  command -v ssh >/dev/null || missing+=(openssh-client)
  command -v pdsh >/dev/null || missing+=(pdsh)
  [ -x /usr/sbin/slurmctld ] || missing+=(slurm-wlm)
  [ -x /usr/sbin/munged ] || missing+=(munge)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# Starts "$@" unless the daemon behind PIDFILE runs, and records it as ours, so `down` stops only what we started.
start() {
  local name=$1 pidfile=$2; shift 2
  if alive "$pidfile"; then return; fi
  "$@"
  for _ in $(seq 100); do alive "$pidfile" && break; sleep 0.1; done
  alive "$pidfile" || { say "$name did not start; its log is in $DIR"; exit 1; }
  if [ -f "$DIR/started" ]; then sed -i "\|^$name /|d" "$DIR/started"; fi  # an earlier record, of a pid now gone
  echo "$name $pidfile" >> "$DIR/started"
}

up_hosts() {
  grep -q "$HOSTS_MARK" /etc/hosts || echo "127.0.0.1 ${NODES[*]} $HOSTS_MARK" >> /etc/hosts
}

up_ssh() {
  mkdir -p "$DIR/ssh" /run/sshd
  [ -f "$DIR/ssh/host_key" ] || ssh-keygen -q -t ed25519 -N "" -f "$DIR/ssh/host_key"
  [ -f "$DIR/ssh/id_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -f "$DIR/ssh/id_ed25519"
  cp "$DIR/ssh/id_ed25519.pub" "$DIR/ssh/authorized_keys"
  cat > "$DIR/ssh/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $DIR/ssh/host_key
PidFile $DIR/ssh/sshd.pid
AuthorizedKeysFile $DIR/ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PrintMotd no
EOF
  cat > "$SSH_CLIENT_CONF" <<EOF
# written by ds_distill tools/local_cluster.sh up; removed by its down
Host ${NODES[*]}
  Port $SSH_PORT
  IdentityFile $DIR/ssh/id_ed25519
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile $DIR/ssh/known_hosts
  LogLevel ERROR
EOF
  start sshd "$DIR/ssh/sshd.pid" /usr/sbin/sshd -f "$DIR/ssh/sshd_config" -E "$DIR/ssh/sshd.log"
  printf '%s slots=1\n' "${NODES[@]}" > "$DIR/hostfile"
}

up_munge() {
  # A munged already running (a machine with SLURM of its own) is used, not replaced.
  if pgrep -x munged >/dev/null && [ ! -f "$DIR/munge/munged.pid" ]; then return; fi
  mkdir -p "$DIR/munge" /run/munge /var/log/munge /var/lib/munge
  chown munge:munge "$DIR/munge" /run/munge /var/log/munge /var/lib/munge
  [ -f /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 || /usr/sbin/create-munge-key -f; }
  chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  start munged "$DIR/munge/munged.pid" runuser -u munge -- /usr/sbin/munged --pid-file="$DIR/munge/munged.pid"
}

up_slurm() {
  mkdir -p "$DIR/slurm/state"
  local host cpus
  host=$(hostname -s)
  cpus=$(( $(nproc) > 1 ? $(nproc) / 2 : 1 ))  # each node daemon offers half the cores
  {
    echo "# written by ds_distill tools/local_cluster.sh up"
    echo "ClusterName=ds-distill-local"
    echo "SlurmctldHost=$host(127.0.0.1)"
    echo "SlurmctldPort=$CTLD_PORT"
    echo "SlurmUser=root"
    echo "AuthType=auth/munge"
    echo "StateSaveLocation=$DIR/slurm/state"
    echo "SlurmdSpoolDir=$DIR/slurm/spool-%n"
    echo "SlurmctldPidFile=$DIR/slurm/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/slurm/slurmd-%n.pid"
    echo "SlurmctldLogFile=$DIR/slurm/slurmctld.log"
    echo "SlurmdLogFile=$DIR/slurm/slurmd-%n.log"
    echo "SlurmdParameters=config_overrides"
    echo "ProctrackType=proctrack/pgid"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "MpiDefault=none"
    echo "ReturnToService=2"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    local i=0
    for node in "${NODES[@]}"; do
      i=$((i + 1))
      echo "NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 Port=$((CTLD_PORT + i)) CPUs=$cpus State=UNKNOWN"
    done
    echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } > "$SLURM_CONF_FILE"
  export SLURM_CONF=$SLURM_CONF_FILE
  start slurmctld "$DIR/slurm/slurmctld.pid" /usr/sbin/slurmctld -f "$SLURM_CONF_FILE"
  for node in "${NODES[@]}"; do
    start "slurmd $node" "$DIR/slurm/slurmd-$node.pid" /usr/sbin/slurmd -f "$SLURM_CONF_FILE" -N "$node"
  done
  for _ in $(seq 100); do  # until every node is up for jobs
    [ "$(sinfo -h -N -t idle,mix,alloc -o %N | sort -u | wc -l)" -ge ${#NODES[@]} ] && return
    sleep 0.2
  done
  say "SLURM nodes not ready: $(sinfo -h -N -o '%N %T %E' | tr '\n' ';'); see $DIR/slurm/*.log"
  exit 1
}

status() {
  [ -f "$DIR/started" ] || { echo "local cluster: not up (nothing started from $DIR)"; return 1; }
  local rc=0 line pidfile
  while read -r line; do
    pidfile=${line##* }
    if alive "$pidfile"; then echo "${line% *}: running, pid $(cat "$pidfile")"; else echo "${line% *}: NOT running"; rc=1; fi
  done < "$DIR/started"
  if [ -f "$SLURM_CONF_FILE" ] && command -v sinfo >/dev/null; then
    SLURM_CONF=$SLURM_CONF_FILE sinfo -h -N -o "slurm node %N: %T" 2>/dev/null || true
  fi
  echo "HOSTFILE=$DIR/hostfile"
  return $rc
}

down() {
  if [ -f "$DIR/started" ]; then
    # in reverse order of starting: node daemons, controller, munged, sshd
    tac "$DIR/started" | while read -r line; do
      pidfile=${line##* }
      if alive "$pidfile"; then
        pid=$(cat "$pidfile"); kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
      fi
    done
    rm -f "$DIR/started"
  fi
  # rewritten in place: /etc/hosts is often a bind mount (containers), which sed -i cannot replace
  local hosts
  hosts=$(grep -v "$HOSTS_MARK" /etc/hosts || true)
  printf '%s\n' "$hosts" > /etc/hosts
  rm -f "$SSH_CLIENT_CONF"
  rm -rf "$DIR"
}

case "${1:-}" in
  up)
    need_root up
    install_missing
    mkdir -p "$DIR"
    up_hosts
    up_ssh
    up_munge
    up_slurm
    echo "SLURM_CONF=$SLURM_CONF_FILE"
    echo "HOSTFILE=$DIR/hostfile"
    ;;
  down) need_root down; down ;;
  status) status ;;
  *) echo "usage: bash tools/local_cluster.sh up|down|status" >&2; exit 2 ;;
esac
