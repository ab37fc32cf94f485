#!/usr/bin/env bash
''':'
# A three-stage teacher-assistant chain end to end on CPU in a few minutes: the demo's T5 teacher trained from
# scratch on its made-up language, then a student at half its width and one of 2+2 blocks at a quarter, each
# cut from the stage before and distilled by it (ds-distill chain; BLEU per stage in OUTPUT_DIR/chain.json).
# Both of these work:
#
#   bash launch_scripts/tiny_cpu.sh                      # starts the DeepSpeed launcher: 2 CPU ranks
#   deepspeed --num_gpus 2 launch_scripts/tiny_cpu.sh    # the launcher runs this file with python
#
# Settings (environment): OUTPUT_DIR (default runs/tiny_cpu; a rerun resumes where the chain stopped),
# NUM_GPUS (ranks, default 2), HOSTFILE (multi-node over ssh, e.g. tools/local_cluster.sh's; its remote ranks
# need DS_ACCELERATOR=cpu in .deepspeed_env), MASTER_PORT (default: a free port). Extra arguments are dotted overrides of
# the chain, e.g. --defaults.train.max_steps=50.
set -euo pipefail
OUTPUT_DIR=${OUTPUT_DIR:-runs/tiny_cpu}
if [ -z "${HOSTFILE:-}" ]; then NUM_GPUS=${NUM_GPUS:-2}; fi  # with a hostfile, its slots say how many per node
source "$(dirname "$0")/_common.sh"   # MASTER_PORT, LAUNCHER
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || export DS_ACCELERATOR=cpu
mkdir -p "$OUTPUT_DIR"
OUTPUT_DIR="$OUTPUT_DIR" "${LAUNCHER[@]}" "$0" "$@" \
  2>&1 | tee -a "$OUTPUT_DIR.log"
exit 0  # (set -e and pipefail already left with the launcher's status on failure)
'''
# Python side: each rank the DeepSpeed launcher starts lands here, and hands over to `ds-distill chain`.
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from ds_distill.cli import main  # noqa: E402
from ds_distill.demo import write_tiny_chain  # noqa: E402

chain_yaml = write_tiny_chain(Path(os.environ.get("OUTPUT_DIR", "runs/tiny_cpu")))
main(["chain", f"--config={chain_yaml}", *sys.argv[1:]])
