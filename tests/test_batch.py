"""Reports over an archive: folders expanded, two torchrun ranks (gloo) sharing the volumes, one
JSON with provenance per volume, a rerun that skips what is done, a bad file that fails alone;
and --deterministic output that is the same on rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib

from med3dvlm.data.phantoms import make_ct_phantom

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def write_scans(folder, n=4):
    folder.mkdir()
    for seed in range(n):
        volume = make_ct_phantom(seed, shape=(64, 64, 32)).volume
        nib.save(nib.Nifti1Image(volume.array, volume.affine), folder / f"case{seed}.nii.gz")
    return folder


def cli(*args, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "med3dvlm.cli"] if torchrun else [sys.executable, "-m", "med3dvlm.cli"]
    proc = subprocess.run([*launcher, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_ranks_share_the_archive_and_a_rerun_skips_what_is_done(tmp_path):
    scans, out = write_scans(tmp_path / "scans"), tmp_path / "out"
    (scans / "broken.nii.gz").write_bytes(b"not a volume")
    proc = cli("report", str(scans), "--output-dir", str(out), "--format", "json", "--device", "cpu", torchrun=True)
    assert "rank 0: 2 reported, 1 failed" in proc.stderr and "rank 1: 2 reported" in proc.stderr  # sorted, r::2
    records = {p.stem: json.loads(p.read_text()) for p in out.glob("case*.json")}
    assert sorted(records) == ["case0", "case1", "case2", "case3"]
    for record in records.values():
        made = record["provenance"]
        assert record["report"].startswith("Findings") and made["model"] == "demo" and made["seconds"] > 0
        (applied,) = made["preprocessing"]["volumes"]
        assert applied["output_shape"] == [32, 128, 128] and applied["window"] == [40.0, 400.0]
        assert made["generation"]["do_sample"] is False
    failed = json.loads((out / "broken.failed.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reported"] == 4 and summary["ranks"] == 2 and list(summary["failed"]) == [failed["volume"]]
    assert summary["provenance"]["weights_blake2b"] == made["weights_blake2b"] and summary["provenance"]["seconds"] > 0

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("case*.json")}
    proc = cli("report", str(scans), "--output-dir", str(out), "--format", "json", "--device", "cpu", torchrun=True)
    assert "rank 0: 0 reported, 1 failed, 2 done before" in proc.stderr  # only the broken one is tried again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("case*.json")} == stamps


def test_deterministic_json_is_the_same_on_rerun(tmp_path):
    scan = write_scans(tmp_path / "scans", n=1) / "case0.nii.gz"

    def run():
        record = json.loads(cli("ask", str(scan), "What is seen?", "--json", "--deterministic", "--sample",
                                "--temperature", "1.5", "--device", "cpu").stdout)
        record["provenance"].pop("seconds"), record["provenance"].pop("created")
        return record

    first = run()
    assert first == run() and first["provenance"]["generation"]["do_sample"] is True
    assert first["provenance"]["seed"] == 0


def test_m3d_evaluation_over_two_ranks_equals_one_process(ct_dataset, tmp_path):
    args = ["evaluate", "m3d", "--root", str(ct_dataset), "--split", "train", "-n", "4", "--n-vqa", "4",
            "--max-new-tokens", "24", "--device", "cpu"]
    cli(*args, "--out", str(tmp_path / "one"))
    proc = cli(*args, "--out", str(tmp_path / "two"), torchrun=True)
    assert proc.stdout.count("Report generation (n=4)") == 1  # rank 0 alone scores and prints
    assert not list((tmp_path / "two").glob("*.rank*.jsonl"))  # the ranks' shards were merged
    one, two = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    assert two["ranks"] == 2 and one["metrics"] == two["metrics"]
    for task in ("report", "vqa_open", "vqa_closed"):
        rows = [{r["id"]: r["prediction"] for r in map(json.loads, (tmp_path / name / f"{task}.jsonl").open())}
                for name in ("one", "two")]
        assert rows[0] == rows[1] and len(rows[0]) >= 4
