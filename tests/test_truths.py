"""Truths without volumes: drawn like the phantom generator draws them, written like its texts."""

import json
from collections import Counter

import numpy as np

from med3dvlm.data.lesions import ALLOWED, LOCATIONS, SIZE_MM
from med3dvlm.data.reports import mentioned_findings
from med3dvlm.train.examples import REPORT_INSTRUCTIONS, Example
from med3dvlm.train.truths import CaseTruth, is_reading, is_report, sample_cases, truth_examples
from med3dvlm.train.volumes import LengthBatchedExamples


def test_sampled_truths_follow_the_generator_tables():
    cases = sample_cases(2000, seed=0)
    counts = Counter(len(c["findings"]) for c in cases)
    assert abs(counts[0] / 2000 - 0.25) < 0.04 and abs(counts[2] / 2000 - 0.35) < 0.04
    for case in cases:
        pairs = [(f["organ"], f["kind"]) for f in case["findings"]]
        assert len(set(pairs)) == len(pairs)
        for f in case["findings"]:
            assert f["kind"] in ALLOWED[f["organ"]]
            assert SIZE_MM[f["kind"]][0] <= f["size_mm"] <= SIZE_MM[f["kind"]][1]
            assert f["kind"] == "fluid" or f["location"] in LOCATIONS[f["organ"]]
    assert sample_cases(5, seed=1) == sample_cases(5, seed=1)


def test_a_truths_report_and_questions_are_the_phantom_writers(ct_dataset):
    case = next(c for c in json.loads((ct_dataset / "labels.json").read_text())["cases"] if c["findings"])
    examples = truth_examples("key", case, 32, np.random.default_rng(0), reports=2)
    reports = [e for e in examples if is_report(e)]
    assert len(reports) == 2 and all(mentioned_findings(r.answer) == CaseTruth.from_case(case).pairs for r in reports)
    closed = [e for e in examples if " Choices: " in e.prompt]
    assert closed and all(e.answer[0] in "ABCD" and e.answer[1] == "." for e in closed)
    assert all(e.image == "key" and e.prompt.startswith("<im_patch>" * 32) for e in examples)
    reading = [e for e in examples if is_reading(e)]
    assert len(reading) == 2 and all(" Choices: " not in e.prompt for e in reading)
    assert any(e.answer == str(len(case["findings"])) for e in reading)
    assert not any(is_report(e) for e in reading) and all(e.prompt.endswith(REPORT_INSTRUCTIONS) for e in reports)


def test_length_batches_mix_answers_of_one_bucket_instead_of_sorting_by_exact_length():
    """Sorted by exact length, every batch would hold one answer; bucketed, each batch mixes them,
    and a report is never padded next to a short answer."""
    examples = [Example(f"v{i}", "q", ("yes", "no")[i % 2]) for i in range(640)]
    examples += [Example(f"r{i}", "q", "Findings: " + "x" * 300) for i in range(64)]
    batches = LengthBatchedExamples({}, examples, batch_size=32).batches
    assert sorted(e.image for b in batches for e in b) == sorted(e.image for e in examples)
    short = [b for b in batches if len(b[0].answer) < 5]
    assert all({e.answer for e in b} == {"yes", "no"} for b in short)
    assert all(len({len(e.answer) > 5 for e in b}) == 1 for b in batches)


def test_a_rerun_reuses_the_work_folders_phantoms_unless_another_generator_wrote_them(tmp_path):
    from med3dvlm.data.phantoms import GENERATOR_VERSION
    from med3dvlm.train.demo import write_shards

    first = write_shards(tmp_path, 2, seed=5)
    labels = [json.loads((root / "labels.json").read_text()) for root in first]
    manifest = first[0] / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert write_shards(tmp_path, 2, seed=5) == first and manifest.stat().st_mtime_ns == stamp   # reused
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "generator_version": "2.0"}))
    assert write_shards(tmp_path, 2, seed=5) == first
    assert json.loads(manifest.read_text())["generator_version"] == GENERATOR_VERSION              # written again
    assert [json.loads((root / "labels.json").read_text()) for root in first] == labels          # same phantoms
