#!/usr/bin/env bash
# The whole job on the embedded default, on CPU or GPU, in minutes: corpus, tokenizer, teacher, distillation,
# and the comparison table. Output in $OUTPUT (default runs/demo), the log beside it in $OUTPUT.log.
#   bash launch_scripts/tiny_cpu_demo.sh          OUTPUT=/tmp/demo bash launch_scripts/tiny_cpu_demo.sh
set -euo pipefail
OUTPUT=${OUTPUT:-runs/demo}
mkdir -p "$(dirname "$OUTPUT")"
python -m ds_distill demo --output_dir="$OUTPUT" 2>&1 | tee "$OUTPUT.log"
