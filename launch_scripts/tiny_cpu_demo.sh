#!/usr/bin/env bash
# The whole job on the embedded default, on CPU or GPU, in minutes: corpus, tokenizer, teacher, distillation,
# and the comparison table.   bash launch_scripts/tiny_cpu_demo.sh [OUTPUT=runs/demo]
set -euo pipefail
OUTPUT=${OUTPUT:-runs/demo}
mkdir -p "$OUTPUT"
python -m ds_distill demo --output_dir="$OUTPUT" 2>&1 | tee "$OUTPUT/demo.log"
