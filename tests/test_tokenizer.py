import json

import pytest

from med3dvlm.errors import ModelError
from med3dvlm.prompts import IMAGE_TOKEN, report_prompt
from med3dvlm.tokenizer import EOS_TOKEN, image_token_id, load_tokenizer, train_tokenizer

REPORTS = [
    "The liver is enlarged with a 3 cm hypodense lesion in segment VII.",
    "No focal lesion. The kidneys are normal in size and shape.",
    "A mass in the left kidney measuring 4.2 x 3.1 cm; no lymphadenopathy.",
    "Mild pleural effusion on the right. The spleen is unremarkable.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(REPORTS * 5, vocab_size=400)


def test_report_round_trip(tokenizer):
    report = "The spleen is enlarged: 14.5 cm (was 12 cm). Ünusual µ chars survive."
    ids = tokenizer.encode(report, add_special_tokens=False)
    assert tokenizer.decode(ids) == report


def test_image_token_is_one_special_token_and_no_bos(tokenizer):
    prompt = report_prompt(8, "Describe the findings.")
    ids = tokenizer.encode(prompt)
    assert ids[:8] == [image_token_id(tokenizer)] * 8  # no BOS in front: Qwen-like
    assert ids[8] != image_token_id(tokenizer)
    assert tokenizer.bos_token is None
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Describe the findings."


def test_left_padding_for_generation(tokenizer):
    batch = tokenizer(["short", "a much longer prompt here"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1


def test_save_load_identical_ids(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = IMAGE_TOKEN * 3 + " Is there a lesion in the liver? Choices: A. yes B. no" + EOS_TOKEN
    assert loaded.encode(text) == tokenizer.encode(text)
    assert len(loaded) == len(tokenizer)
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.padding_side) == (
        tokenizer.pad_token_id, tokenizer.eos_token_id, "left")


def test_load_errors_name_the_folder(tokenizer, tmp_path):
    with pytest.raises(ModelError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_load_rejects_tokenizer_without_image_token(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != IMAGE_TOKEN]
    data["model"]["vocab"].pop(IMAGE_TOKEN)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for key in ("extra_special_tokens", "additional_special_tokens", "added_tokens_decoder"):
        config.pop(key, None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="no single <im_patch> token"):
        load_tokenizer(tmp_path)
