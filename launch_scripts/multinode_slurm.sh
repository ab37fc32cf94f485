#!/usr/bin/env bash
#SBATCH --job-name=ds_distill
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --output=%x-%j.out
# Multi-node distillation under SLURM without ssh: one DeepSpeed launcher per node (--no_ssh), each told its node
# rank, all pointed at the first node. OUTPUT must be on a filesystem all nodes share.
#
#   sbatch launch_scripts/multinode_slurm.sh [--train.max_steps=...]
#   CONFIG=run.yaml sbatch launch_scripts/multinode_slurm.sh
#   CPU nodes: DS_ACCELERATOR=cpu GPUS_PER_NODE=1 SBATCH_GPUS_PER_NODE=0 sbatch launch_scripts/multinode_slurm.sh
#
# Settings (environment, passed on to every node by srun): CONFIG=RUN.yaml or RECIPE=NAME (default
# flan_t5_3b_145m), ZERO_STAGE (student, 2|3), TEACHER (replicated|zero3|cpu|nvme), OUTPUT, MASTER_PORT,
# GPUS_PER_NODE (ranks per node; default the GPUs SLURM gave). SBATCH_NODES etc. override the #SBATCH lines.
# The job's log is %x-%j.out in the directory sbatch ran in; every launcher's output is also appended to $OUTPUT.log.
# Resubmitting the same job resumes from the newest complete checkpoint in OUTPUT.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
source launch_scripts/_common.sh   # TEACHER_DS, MASTER_PORT, run_args (sbatch runs a copy of this file elsewhere)
run_args distill flan_t5_3b_145m
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
ARGS=$(printf '%q ' "${RUN_ARGS[@]}" "$@")  # quoted again for the inner shell, so values with spaces survive
mkdir -p "$(dirname "$OUTPUT")"
# Each node's launcher reads the job's nodes from a hostfile of its own (without one it takes the job for one node).
srun --kill-on-bad-exit=1 bash -c "hosts=\$(mktemp) && trap 'rm -f \$hosts' EXIT && \
  scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | sed 's/\$/ slots=$GPUS_PER_NODE/' > \$hosts && \
  deepspeed --hostfile \$hosts --no_ssh --num_nodes $SLURM_NNODES --num_gpus $GPUS_PER_NODE \
  --node_rank \$SLURM_NODEID --master_addr $MASTER_ADDR --master_port $MASTER_PORT \
  --module ds_distill distill $ARGS" 2>&1 | tee -a "$OUTPUT.log"
