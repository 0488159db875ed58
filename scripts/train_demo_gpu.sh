#!/usr/bin/env bash
# The demo model built from fresh phantoms on one CUDA GPU, in one call: the recipe of
# `med3dvlm train demo` with GPU-sized batches (scripts/demo_gpu_recipe.json, or the JSON file
# in MED3DVLM_DEMO_RECIPE), phantoms made on all of the machine's CPU cores. Writes the model
# folder (weights, tokenizer, siglip/, recipe.json with the gates, the segmenter's learning curve
# and the timings). Without a GPU the same command runs on the CPU (the suite runs it tiny).
#
#   scripts/train_demo_gpu.sh [OUT] [WORK] [more `med3dvlm train demo` options]
set -euo pipefail
out=${1:-resources/models/demo}
work=${2:-runs/demo-work-gpu}
shift $(( $# < 2 ? $# : 2 ))
recipe=${MED3DVLM_DEMO_RECIPE:-"$(dirname "$0")/demo_gpu_recipe.json"}
export OMP_WAIT_POLICY=PASSIVE  # torch's spinning OpenMP threads slow the phantom workers beside it
exec python -m med3dvlm.cli train demo --out "$out" --work "$work" --recipe "$recipe" "$@"
