#!/usr/bin/env bash
# Multi-node distillation over ssh with a DeepSpeed hostfile ("node1 slots=8" per line). Variables the ranks
# need on remote nodes (HF_HOME, NCCL_*) go in .deepspeed_env, one NAME=value per line.
#   HOSTFILE=hosts bash launch_scripts/multinode_hostfile.sh [--train.max_steps=...]
set -euo pipefail
HOSTFILE=${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile}
RECIPE=${RECIPE:-flan_t5_3b_145m}
ZERO_STAGE=${ZERO_STAGE:-2}
OUTPUT=${OUTPUT:-runs/${RECIPE}}
mkdir -p "$(dirname "$OUTPUT")"
deepspeed --hostfile "$HOSTFILE" --module ds_distill distill --recipe="$RECIPE" --train.output_dir="$OUTPUT" \
  --student.deepspeed_config="ds_configs/student_zero${ZERO_STAGE}.json" "$@" 2>&1 | tee -a "$OUTPUT.log"
