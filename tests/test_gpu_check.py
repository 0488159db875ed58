"""benchmarks/gpu_check.sh --tiny: the GPU check's code path (official-layout folder, load, encode,
first and follow-up question, decode speed, an evidence map, 8/4-bit) on the CPU with a tiny config."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_writes_its_results(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--tiny", "--results", str(tmp_path), "--work",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "decode" in done.stdout and "(target >= 110)" in done.stdout and "(target <= 0.3)" in done.stdout
    [path] = tmp_path.glob("gpu_check_*_tiny.json")
    results = json.loads(path.read_text())
    assert results["tiny"] and results["build"]["shards"] > 1
    bf16 = results["modes"][0]
    assert "error" not in bf16, bf16
    assert bf16["decode_tokens"] == results["new_tokens"] and bf16["decode_tokens_per_s"] > 0
    assert 0 < bf16["ttft_followup_s"] and 0 < bf16["encode_s"] and bf16["load_s"] > 0
    assert "explain_error" not in bf16, bf16["explain_error"]
    assert bf16["explain_samples"] == 1 and bf16["explain_s"] > 0 and bf16["explain_map_nonzero"]
    assert "explain s" in done.stdout
    assert {m["quantization"] for m in results["modes"]} == {"none (bfloat16)", "8bit", "4bit"}
    assert "tests/test_preprocess.py::test_cuda_matches_cpu" in results["cuda_tests"]["tests"]
    assert not list(tmp_path.glob("tmp*"))  # the random-weight folder is removed afterwards
