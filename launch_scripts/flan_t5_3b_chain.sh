#!/usr/bin/env bash
''':'
# Flan-T5-XL (2.8B) -> 12+12-block assistant -> 6+6-block student (19.2x smaller), WMT'13 EN->ES, as one
# teacher-assistant chain (recipe flan_t5_3b_chain), on one node or many. Both of these work:
#
#   deepspeed launch_scripts/flan_t5_3b_chain.sh                          # the launcher runs this file with python
#   bash launch_scripts/flan_t5_3b_chain.sh [--defaults.train.max_steps=...] # starts the DeepSpeed launcher
#
# Settings (environment): ZERO_STAGE=2|3 (students, default 2), OUTPUT=runs/flan_t5_3b_chain (a rerun resumes
# the chain where it stopped), NUM_GPUS (default: all), HOSTFILE (multi-node, ssh; see multinode_hostfile.sh),
# CONFIG=CHAIN.yaml (a chain of your own instead of the recipe; ZERO_STAGE and TEACHER then override its defaults
# only when set),
# TEACHER=replicated|zero3|cpu|nvme (where the teacher lives; default replicated, a bf16 copy per GPU),
# MASTER_PORT (default: a free port, so that two jobs on one machine do not collide; under
# `deepspeed launch_scripts/...` give the launcher --master_port yourself).
# The launcher's output is also appended to $OUTPUT.log.
# Extra arguments are dotted config overrides. The file is both bash and python: bash runs this block and
# exits; python reads it as a string and runs the part below.
set -euo pipefail
source "$(dirname "$0")/_common.sh"   # TEACHER_DS, MASTER_PORT, LAUNCHER, run_args
run_args chain flan_t5_3b_chain
mkdir -p "$(dirname "$OUTPUT")"
"${LAUNCHER[@]}" --module ds_distill chain "${RUN_ARGS[@]}" "$@" 2>&1 | tee -a "$OUTPUT.log"
exit 0  # (set -e and pipefail already left with the launcher's status on failure)
'''
# Python side: each rank the DeepSpeed launcher starts lands here, with the same settings as above.
import sys

from ds_distill.cli import main
from ds_distill.cli.scripts import run_args

main(["chain", *run_args("chain", "flan_t5_3b_chain"), *sys.argv[1:]])
