#!/usr/bin/env bash
''':'
# Flan-T5-XL (2.8B) -> student on WMT'13 EN->ES, on one node or many. Both of these work:
#
#   deepspeed launch_scripts/flan_t5_3b.sh                    # the DeepSpeed launcher runs this file with python
#   bash launch_scripts/flan_t5_3b.sh [--train.max_steps=...] # starts the DeepSpeed launcher itself
#
# Settings (environment): SIZE=145m|250m|425m|780m (default 145m), ZERO_STAGE=2|3 (student, default 2),
# OUTPUT=runs/flan_t5_3b_$SIZE, NUM_GPUS (default: all), HOSTFILE (multi-node, ssh),
# TEACHER=replicated|zero3|cpu|nvme (where the teacher lives; default replicated, a bf16 copy per GPU),
# MASTER_PORT (default: a free port, so that two jobs on one machine do not collide; under
# `deepspeed launch_scripts/...` give the launcher --master_port yourself).
# The launcher's output is also appended to $OUTPUT.log.
# Extra arguments are dotted config overrides. The file is both bash and python: bash runs this block and
# exits; python reads it as a string and runs the part below.
set -euo pipefail
SIZE=${SIZE:-145m}
ZERO_STAGE=${ZERO_STAGE:-2}
OUTPUT=${OUTPUT:-runs/flan_t5_3b_${SIZE}}
source "$(dirname "$0")/_common.sh"   # TEACHER_DS, MASTER_PORT, LAUNCHER
mkdir -p "$(dirname "$OUTPUT")"
"${LAUNCHER[@]}" --module ds_distill distill --recipe="flan_t5_3b_${SIZE}" \
  --train.output_dir="$OUTPUT" --student.deepspeed_config="ds_configs/student_zero${ZERO_STAGE}.json" \
  --teacher.deepspeed_config="$TEACHER_DS" "$@" 2>&1 | tee -a "$OUTPUT.log"
exit 0  # (set -e and pipefail already left with the launcher's status on failure)
'''
# Python side: each rank the DeepSpeed launcher starts lands here, with the same settings as above.
import os
import sys

from ds_distill.cli import main
from ds_distill.config.deepspeed import TEACHER_PLACEMENTS

size = os.environ.get("SIZE", "145m")
teacher = TEACHER_PLACEMENTS[os.environ.get("TEACHER", "replicated")]
main([
    "distill",
    f"--recipe=flan_t5_3b_{size}",
    f"--train.output_dir={os.environ.get('OUTPUT', f'runs/flan_t5_3b_{size}')}",
    f"--student.deepspeed_config=ds_configs/student_zero{os.environ.get('ZERO_STAGE', '2')}.json",
    f"--teacher.deepspeed_config={teacher}",
    *sys.argv[1:],
])
