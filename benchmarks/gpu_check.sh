#!/usr/bin/env bash
# GPU check (see benchmarks/README.md): bash benchmarks/gpu_check.sh [--tiny] [--work DIR] [--modes bf16,8bit,4bit]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
