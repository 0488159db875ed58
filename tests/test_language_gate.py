"""The language-stage gate: oracle tokens carry the truth, and a language model that does not say
what they carry stops the demo build in one sentence."""

import json

import pytest
import torch
from transformers import Qwen2Config

from med3dvlm.data.m3d import CAP_JSON, read_cap, read_vqa
from med3dvlm.models.dcformer import DCFormerConfig
from med3dvlm.tokenizer import train_tokenizer
from med3dvlm.train.config import TrainConfig
from med3dvlm.train.examples import caption_examples, vqa_examples
from med3dvlm.train.oracle import (FACTS, LanguageGate, LanguageGateFailed, case_facts, language_gate,
                                   oracle_features, oracle_tokens)
from med3dvlm.train.stages import build_vlm, vlm_stage
from med3dvlm.train.truths import sample_cases


def test_oracle_tokens_carry_every_fact_size_and_location_a_linear_read_out_recovers():
    cases = sample_cases(500, seed=0)
    tokens = torch.stack([oracle_tokens(c, 32, 64, noise=0.1, generator=torch.Generator().manual_seed(i))
                          for i, c in enumerate(cases)]).flatten(1)
    facts = torch.stack([case_facts(c) for c in cases])
    sizes = torch.tensor([[next((f["size_mm"] for f in c["findings"] if f"{f['organ']}/{f['kind']}" == name), 0.0)
                           for name in FACTS] for c in cases])
    fit, test = slice(0, 400), slice(400, 500)
    read = torch.linalg.lstsq(tokens[fit], torch.cat([facts, sizes], 1)[fit]).solution
    said = tokens[test] @ read
    assert ((said[:, :len(FACTS)] > 0.5) == facts[test].bool()).float().mean() > 0.99
    found = facts[test].bool()
    assert (said[:, len(FACTS):][found] - sizes[test][found]).abs().mean() < 3.0   # mm
    assert torch.equal(oracle_tokens(cases[0], 32, 64, noise=0.0), oracle_tokens(cases[0], 32, 64, noise=0.0))


def test_present_findings_share_a_direction_one_query_finds_and_absent_ones_are_one_empty_token():
    def case(*findings):
        return {"modality": "CT", "phase": "non-contrast",
                "findings": [{"organ": o, "kind": k, "size_mm": 32, "location": "base", "center_mm": [0, 0, 0]}
                             for o, k in findings]}
    empty = oracle_tokens(case(), 32, 64, noise=0.0)
    two = oracle_tokens(case(("liver", "fluid"), ("spleen", "mass")), 32, 64, noise=0.0)
    pairs = [i for i, name in enumerate(FACTS) if "/" in name]
    assert torch.equal(empty[pairs], empty[:1].expand(len(pairs), -1)) and torch.equal(empty[-1], empty[0])
    liver, spleen = two[FACTS.index("liver/fluid")], two[FACTS.index("spleen/mass")]
    assert torch.dot(liver, spleen) > 0.9   # no organ, kind or rank in common: "present" (weight 1) alone
    assert torch.dot(liver, empty[0]).abs() < 1e-4 * liver.norm() * empty[0].norm()


def test_the_kidneys_and_the_spleen_have_locations_of_their_own():
    def at(organ):
        return oracle_tokens({"modality": "CT", "phase": "non-contrast", "findings": [
            {"organ": organ, "kind": "cyst", "size_mm": 35, "location": "upper pole", "center_mm": [0, 0, 0]}]},
            32, 64, noise=0.0)[FACTS.index(f"{organ}/cyst")]
    left, right, spleen = at("left kidney"), at("right kidney"), at("spleen")
    # shared: kind, present; apart: organ, value, location
    assert torch.dot(left, right) / (left.norm() * right.norm()) < 0.6
    assert torch.dot(left, spleen) / (left.norm() * spleen.norm()) < 0.6


def test_case_facts_follow_labels_json(ct_dataset):
    case = json.loads((ct_dataset / "labels.json").read_text())["cases"][0]
    facts = dict(zip(FACTS, case_facts(case).tolist()))
    assert facts[f"phase:{case['phase']}"] == 1 and facts["modality:CT"] == 1 and facts["modality:MR"] == 0
    assert sum(v for k, v in facts.items() if "/" in k) == len({(f["organ"], f["kind"]) for f in case["findings"]})


@pytest.fixture(scope="module")
def tiny_language_stage(ct_dataset, tmp_path_factory):
    caps = read_cap(ct_dataset / CAP_JSON, "train")
    vqas = read_vqa(ct_dataset / "M3D-VQA" / "M3D_VQA_train.csv")
    tokenizer = train_tokenizer([c.text for c in caps] + [f"{q.question} {' '.join(q.choices)} {q.answer}" for q in vqas],
                                vocab_size=400)
    lm = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, intermediate_size=128, max_position_embeddings=512,
                     tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = build_vlm(tokenizer, DCFormerConfig.preset("nano", input_size=(32, 128, 128)), lm, "demo",
                      prompt_style="exact", low_output_size=(8, 24), high_output_size=(4, 8))
    features = oracle_features([ct_dataset], model.config.num_image_tokens, 64)
    n = model.config.num_image_tokens
    run = vlm_stage(model, features, caption_examples(caps, n) + vqa_examples(vqas, n), tokenizer,
                    TrainConfig(output_dir=str(tmp_path_factory.mktemp("oracle")), epochs=4, batch_size=8, lr=3e-3,
                                progress=False), train_lm=True, max_length=512)
    return model, tokenizer, features, run


def test_the_language_stage_trains_on_oracle_tokens_and_is_scored_like_a_model(tiny_language_stage, ct_dataset):
    model, tokenizer, features, run = tiny_language_stage
    assert sum(run.losses[-5:]) < 0.7 * sum(run.losses[:5])   # steps' losses are noisy: compare five and five
    scores = language_gate(model, tokenizer, features, ct_dataset,
                           LanguageGate(recall=0.0, invented=1.0, closed_vqa=0.0, n_phantoms=4))
    assert scores["n_volumes"] == 4 and 0 <= scores["report_recall"] <= 1
    assert isinstance(scores["example_report"], str) and 0 <= scores["closed_vqa_accuracy"] <= 1


def test_a_language_stage_below_the_gate_stops_the_build_in_one_sentence(tiny_language_stage, ct_dataset):
    model, tokenizer, features, _ = tiny_language_stage
    with pytest.raises(LanguageGateFailed, match=r"^LANGUAGE GATE FAILED: .* fix the language stage's recipe") as error:
        language_gate(model, tokenizer, features, ct_dataset,
                      LanguageGate(recall=1.01, invented=0.0, closed_vqa=1.01, n_phantoms=4))
    assert "\n" not in str(error.value)


def test_a_findings_rank_among_those_present_is_one_direction_the_first_and_second_differ():
    def case(*findings):
        return {"modality": "CT", "phase": "non-contrast",
                "findings": [{"organ": o, "kind": k, "size_mm": 32, "location": "base", "center_mm": [0, 0, 0]}
                             for o, k in findings]}
    first = FACTS.index("liver/fluid")
    alone = oracle_tokens(case(("liver", "fluid")), 32, 64, noise=0.0)
    # a finding read before the liver's (the lungs come first) makes the liver's the second
    second = oracle_tokens(case(("liver", "fluid"), ("left lung", "mass")), 32, 64, noise=0.0)
    shift = second[first] - alone[first]
    assert shift.norm() > 2.0 and torch.equal(alone[FACTS.index("phase:non-contrast")],
                                              second[FACTS.index("phase:non-contrast")])
    with pytest.raises(ValueError, match="at most"):
        oracle_tokens(case(("liver", "fluid"), ("left lung", "mass"), ("spleen", "cyst")), 32, 64)
