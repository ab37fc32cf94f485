#!/usr/bin/env bash
# Multi-node distillation over ssh, through DeepSpeed's pdsh runner and a DeepSpeed hostfile ("node1 slots=8" per
# line). This node must reach every node by ssh without a password, the repository and the data must sit at the
# same path on each, and OUTPUT on a filesystem all nodes share (checkpoints are written by every rank).
# The runner passes on few of this shell's variables (PYTHON*, NCCL_*, ...): what the remote ranks need
# (DS_ACCELERATOR, HF_HOME, NCCL_SOCKET_IFNAME, ...) goes in .deepspeed_env, here or in ~, one NAME=value per line.
#
#   HOSTFILE=hosts bash launch_scripts/multinode_hostfile.sh [--train.max_steps=...]
#   HOSTFILE=hosts CONFIG=run.yaml bash launch_scripts/multinode_hostfile.sh
#
# Settings: CONFIG=RUN.yaml or RECIPE=NAME (default flan_t5_3b_145m), ZERO_STAGE (student, 2|3), TEACHER
# (replicated|zero3|cpu|nvme), OUTPUT, NUM_GPUS (per node; default: the hostfile's slots), MASTER_PORT.
# Extra arguments are dotted config overrides. The launcher's output is also appended to $OUTPUT.log.
# A rerun of the same command resumes from the newest complete checkpoint in OUTPUT.
set -euo pipefail
HOSTFILE=${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile}
source "$(dirname "$0")/_common.sh"   # TEACHER_DS, MASTER_PORT, LAUNCHER, run_args
run_args distill flan_t5_3b_145m
mkdir -p "$(dirname "$OUTPUT")"
"${LAUNCHER[@]}" --module ds_distill distill "${RUN_ARGS[@]}" "$@" 2>&1 | tee -a "$OUTPUT.log"
