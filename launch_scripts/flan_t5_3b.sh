#!/usr/bin/env bash
''':'
# Flan-T5-XL (2.8B) -> student on WMT'13 EN->ES, on one node or many. Both of these work:
#
#   deepspeed launch_scripts/flan_t5_3b.sh                    # the DeepSpeed launcher runs this file with python
#   bash launch_scripts/flan_t5_3b.sh [--train.max_steps=...] # starts the DeepSpeed launcher itself
#
# Settings (environment): SIZE=145m|250m|425m|780m (default 145m), ZERO_STAGE=2|3 (student, default 2),
# OUTPUT=runs/flan_t5_3b_$SIZE, NUM_GPUS (default: all), HOSTFILE (multi-node, ssh; see multinode_hostfile.sh),
# CONFIG=RUN.yaml (a run of your own instead of the recipe; ZERO_STAGE and TEACHER then override it only when set),
# TEACHER=replicated|zero3|cpu|nvme (where the teacher lives; default replicated, a bf16 copy per GPU),
# MASTER_PORT (default: a free port, so that two jobs on one machine do not collide; under
# `deepspeed launch_scripts/...` give the launcher --master_port yourself).
# The launcher's output is also appended to $OUTPUT.log.
# Extra arguments are dotted config overrides. The file is both bash and python: bash runs this block and
# exits; python reads it as a string and runs the part below.
set -euo pipefail
source "$(dirname "$0")/_common.sh"   # TEACHER_DS, MASTER_PORT, LAUNCHER, run_args
run_args distill "flan_t5_3b_${SIZE:-145m}"
mkdir -p "$(dirname "$OUTPUT")"
"${LAUNCHER[@]}" --module ds_distill distill "${RUN_ARGS[@]}" "$@" 2>&1 | tee -a "$OUTPUT.log"
exit 0  # (set -e and pipefail already left with the launcher's status on failure)
'''
# Python side: each rank the DeepSpeed launcher starts lands here, with the same settings as above.
import os
import sys

from ds_distill.cli import main
from ds_distill.cli.scripts import run_args

main(["distill", *run_args("distill", f"flan_t5_3b_{os.environ.get('SIZE', '145m')}"), *sys.argv[1:]])
