#!/usr/bin/env bash
#SBATCH --job-name=ds_distill
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --output=%x-%j.out
# Multi-node distillation under SLURM without ssh: one DeepSpeed launcher per node (--no_ssh), each told its
# node rank, all pointed at the first node.   sbatch launch_scripts/multinode_slurm.sh [--train.max_steps=...]
# Settings: RECIPE (default flan_t5_3b_145m), ZERO_STAGE (student, 2|3), OUTPUT, MASTER_PORT.
set -euo pipefail
RECIPE=${RECIPE:-flan_t5_3b_145m}
ZERO_STAGE=${ZERO_STAGE:-2}
OUTPUT=${OUTPUT:-runs/${RECIPE}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
EXTRA_ARGS=$(printf '%q ' "$@")  # quoted again for the inner shell, so values with spaces survive
mkdir -p "$(dirname "$OUTPUT")"
srun --kill-on-bad-exit=1 bash -c "deepspeed --no_ssh --num_nodes $SLURM_NNODES --num_gpus $GPUS_PER_NODE \
  --node_rank \$SLURM_NODEID --master_addr $MASTER_ADDR --master_port $MASTER_PORT \
  --module ds_distill distill --recipe=$RECIPE --train.output_dir=$OUTPUT \
  --student.deepspeed_config=ds_configs/student_zero${ZERO_STAGE}.json $EXTRA_ARGS" 2>&1 | tee -a "$OUTPUT.log"
