"""M3D-LaMed releases as published: a SentencePiece tokenizer only, and several stop tokens.

The official M3D-LaMed-Llama-2-7B and -Phi-3-4B folders hold ``tokenizer.model`` and no
``tokenizer.json``: the official code (BAAI-DCAI/M3D, transformers 4.39) loads the base tokenizer
with ``use_fast=False``, adds ``<im_patch>``, ``<bx_start>``, ``<bx_end>`` as special tokens and
``[SEG]`` as a plain added token, sets pad to unk when there is none, and its merge script saves that
slow tokenizer. Folders written here follow that layout with a SentencePiece BPE model trained in the
test (byte fallback and a dummy prefix, as Llama's), and a random-weight model of each family.
"""

import io
import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, Phi3Config

spm = pytest.importorskip("sentencepiece")
from sentencepiece import sentencepiece_model_pb2  # noqa: E402  (needs protobuf, a core dependency)

from med3dvlm import tokenizer as tokenizer_module  # noqa: E402
from med3dvlm.errors import ModelError  # noqa: E402
from med3dvlm.models.m3d_lamed import M3DLaMed, M3DLaMedConfig, PoolingProjectorConfig, ViT3DConfig  # noqa: E402
from med3dvlm.official import load_official  # noqa: E402
from med3dvlm.pipeline import load  # noqa: E402
from med3dvlm.prompts import report_prompt, vqa_prompt  # noqa: E402
from test_official import VIT, randomized, write_official  # noqa: E402

TEXTS = ["Describe the findings of the medical image you see.", "The liver shows a hypodense lesion.",
         "Is there a cyst in the left kidney?", "No focal lesion; the spleen is normal.",
         "Where is the liver lesion?", "Which organ is enlarged?"] * 10
M3D_SPECIAL = ["<im_patch>", "<bx_start>", "<bx_end>"]
# Phi-3's own added tokens, in its order; <|endoftext|>, <|assistant|> and <|end|> are its stop tokens.
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
PHI3_STOPS = ["<|endoftext|>", "<|assistant|>", "<|end|>"]
N = 8  # image tokens of the tiny encoder (VIT in test_official)


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS), model_writer=model, model_type="bpe", vocab_size=400, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, split_digits=True, minloglevel=2)
    return model.getvalue()


def token_entry(content: str, special: bool = True, rstrip: bool = False) -> dict:
    return {"content": content, "lstrip": False, "normalized": not special, "rstrip": rstrip,
            "single_word": False, "special": special}


def write_slow_tokenizer(folder, sp_model: bytes, family: str, legacy: bool | None = False) -> dict[str, int]:
    """The files a transformers 4.39 slow LlamaTokenizer saves (both families declare LlamaTokenizer);
    returns the added tokens and their ids. ``legacy=None`` leaves the key out."""
    (folder / "tokenizer.model").write_bytes(sp_model)
    size = spm.SentencePieceProcessor(model_proto=sp_model).get_piece_size()
    base = PHI3_ADDED if family == "phi3" else []
    added = {token: size + i for i, token in enumerate([*base, *M3D_SPECIAL, "[SEG]"])}
    decoder = {"0": token_entry("<unk>"), "1": token_entry("<s>"), "2": token_entry("</s>")}
    for token, index in added.items():  # Phi-3 strips the space after its chat markers
        decoder[str(index)] = token_entry(token, token != "[SEG]", rstrip=token in base[1:])
    eos, pad = ("<|endoftext|>", "<|endoftext|>") if family == "phi3" else ("</s>", "<unk>")
    special = {"additional_special_tokens": M3D_SPECIAL, "bos_token": "<s>", "eos_token": eos, "pad_token": pad,
               "unk_token": "<unk>"}
    config = {**special, "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
              "clean_up_tokenization_spaces": False, "legacy": legacy, "model_max_length": 512,
              "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"}
    if legacy is None:
        del config["legacy"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "added_tokens.json").write_text(json.dumps(added))
    return added


def slow_ids(sp_model: bytes, added: dict[str, int], text: str, legacy: bool = False) -> list[int]:
    """The ids transformers 4.39's slow LlamaTokenizer gives, worked out with sentencepiece itself
    (transformers 5 no longer has that class: its LlamaTokenizer is a converted fast tokenizer).

    The slow tokenizer adds BOS, cuts the text at added tokens (each is its own id) and encodes each
    piece between them with SentencePiece. legacy=True: every piece gets SentencePiece's dummy "▁"
    prefix, so text after ``<im_patch>`` starts a new word. legacy=False (the released setting): only
    the start of the whole text gets it (it prefixes "▁" and loads the model with add_dummy_prefix off),
    so nothing is added after ``<im_patch>``: "Describe" starts with "D", " Is" is "▁Is".
    """
    with_prefix = spm.SentencePieceProcessor(model_proto=sp_model)
    proto = sentencepiece_model_pb2.ModelProto.FromString(sp_model)
    proto.normalizer_spec.add_dummy_prefix = False
    without_prefix = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    ids, start = [1], True
    for piece in re.split("(" + "|".join(map(re.escape, added)) + ")", text):
        if piece in added:
            ids.append(added[piece])
        elif piece:
            ids += (with_prefix if legacy or start else without_prefix).encode(piece)
        start = False
    return ids


def m3d_release(folder, sp_model: bytes, family: str, legacy: bool | None = False):
    """(folder, reference model, added token ids) of a small M3D-LaMed release in the official layout."""
    added = write_slow_tokenizer(folder, sp_model, family, legacy)
    eos = added["<|endoftext|>"] if family == "phi3" else 2
    common = dict(vocab_size=max(added.values()) + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=eos,
                  pad_token_id=eos if family == "phi3" else 0)
    text = Phi3Config(**common, original_max_position_embeddings=512) if family == "phi3" else LlamaConfig(**common)
    vision = ViT3DConfig(**VIT)
    projector = PoolingProjectorConfig(grid=vision.grid, in_dim=32, out_dim=64)
    model = randomized(M3DLaMed(M3DLaMedConfig(text, vision, projector, image_token_id=added["<im_patch>"])))
    write_official(folder, model, {
        "model_type": f"lamed_{family}", "architectures": [f"Lamed{'Phi3' if family == 'phi3' else 'Llama'}ForCausalLM"],
        "image_channel": 1, "image_size": list(VIT["image_size"]), "patch_size": list(VIT["patch_size"]),
        "vision_tower": "vit3d", "vision_select_layer": -1, "vision_select_feature": "patch", "mm_hidden_size": 32,
        "mm_projector_type": "spp", "proj_layer_type": "mlp", "proj_layer_num": 2, "proj_pooling_type": "spatial",
        "proj_pooling_size": 2, "img_token_id": added["<im_patch>"], "seg_token_id": added["[SEG]"],
        "vit_num_layers": 2, "vit_num_heads": 4, "vit_mlp_dim": 64}, shards=2)
    # As the base models publish them: Phi-3's chat model lists three stop tokens, Llama-2 one.
    stops = [added[t] for t in PHI3_STOPS] if family == "phi3" else 2
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": stops, "pad_token_id": common["pad_token_id"]}))
    return folder, model, added


@pytest.fixture(scope="module", params=["llama", "phi3"])
def release(request, tmp_path_factory, sp_model):
    return (request.param, *m3d_release(tmp_path_factory.mktemp(f"M3D-LaMed-{request.param}"), sp_model,
                                        request.param))


QUESTIONS = [report_prompt(N), vqa_prompt(N, "Is there a cyst in the left kidney?"), report_prompt(N, "Where is it?")]


def test_sentencepiece_only_release_gives_the_official_slow_ids(release, sp_model):
    family, folder, reference, added = release
    assert not (folder / "tokenizer.json").exists()
    model, tokenizer = load_official(folder)
    assert len(tokenizer) == len(added) + 400 and tokenizer.convert_tokens_to_ids("<im_patch>") == added["<im_patch>"]
    for prompt in QUESTIONS:
        expected = slow_ids(sp_model, added, prompt)
        assert tokenizer(prompt)["input_ids"] == expected
        assert expected[:N + 1] == [1] + [added["<im_patch>"]] * N  # BOS, then the image run
        assert expected != slow_ids(sp_model, added, prompt, legacy=True)  # the "▁" after <im_patch> is told apart
    first_word = tokenizer.convert_ids_to_tokens(tokenizer(report_prompt(N))["input_ids"][N + 1])
    assert first_word.startswith("D")  # "Describe" after <im_patch>: no "▁" of its own
    assert model.config.prompt_style == "exact"  # the BOS puts the image over the placeholders at 1..N
    assert tokenizer.pad_token == ("<|endoftext|>" if family == "phi3" else "<unk>")
    # The loaded release computes on those ids what the same weights compute on the official ones.
    pixels = torch.rand(1, 1, *VIT["image_size"], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours = model(input_ids=tokenizer(QUESTIONS[1], return_tensors="pt")["input_ids"], pixels=pixels).logits
        official = reference(input_ids=torch.tensor([slow_ids(sp_model, added, QUESTIONS[1])]), pixels=pixels).logits
    assert torch.equal(ours, official)


@pytest.mark.parametrize("legacy", [True, None])  # None: the key is absent, which the slow class read as True
def test_legacy_sentencepiece_tokenizer_keeps_its_ids(legacy, sp_model, tmp_path):
    added = write_slow_tokenizer(tmp_path, sp_model, "llama", legacy)
    tokenizer = tokenizer_module.load_release_tokenizer(tmp_path, LlamaConfig())
    for prompt in QUESTIONS:
        assert tokenizer(prompt)["input_ids"] == slow_ids(sp_model, added, prompt, legacy=True)


def steer(model, added: dict[str, int], last_prompt_id: int, word_id: int, stop_id: int) -> None:
    """Weights whose greedy answer is ``word``, then ``stop``, then ``word`` again and so on.

    With the attention and MLP outputs zeroed, each position's last hidden state is its own token's
    embedding, so the next token depends on the current one alone: prompt end -> word -> stop -> word.
    """
    lm = model.language_model
    hidden = lm.config.hidden_size
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = lm.get_input_embeddings().weight, lm.lm_head.weight
        one, two = torch.eye(hidden)[0], torch.eye(hidden)[1]
        embed[last_prompt_id], embed[word_id], embed[stop_id] = 5 * one, 5 * two, 5 * one
        head[word_id], head[stop_id] = 50 * one, 50 * two


def stop_cases():
    return [("llama", "</s>"), *(("phi3", stop) for stop in PHI3_STOPS)]


@pytest.mark.parametrize("family,stop", stop_cases())
def test_generation_stops_at_every_listed_stop_token(family, stop, sp_model, tmp_path):
    folder, _, added = m3d_release(tmp_path, sp_model, family)
    pipe = load(folder, device="cpu", dtype="float32")
    stop_id = added.get(stop, 2)
    listed = [added[t] for t in PHI3_STOPS] if family == "phi3" else [2]
    assert pipe.stop_token_ids == listed  # the tokenizer's EOS is the first of them
    pipe.preprocess_config = replace(pipe.preprocess_config, shape=VIT["image_size"])  # the tiny encoder's input
    prompt_end = pipe.tokenizer(report_prompt(N))["input_ids"][-1]
    word = pipe.tokenizer.convert_tokens_to_ids("▁liver")
    steer(pipe.model, added, prompt_end, word, stop_id)
    volume = (np.random.default_rng(0).random((12, 40, 40)).astype(np.float32), np.eye(4))
    # Past a missed stop token the weights say "liver" again: "liver liver liver ...".
    assert pipe.report(volume, max_new_tokens=8) == "liver"
    assert pipe.report_batch([volume, volume], max_new_tokens=8) == ["liver", "liver"]


def test_sentencepiece_release_needs_its_readers(sp_model, tmp_path, monkeypatch):
    write_slow_tokenizer(tmp_path, sp_model, "phi3")
    monkeypatch.setattr(tokenizer_module, "_importable", lambda name: name != "google.protobuf")
    with pytest.raises(ModelError, match=r"SentencePiece model \(tokenizer.model\).*pip install sentencepiece protobuf\."):
        tokenizer_module.load_release_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    no_files = r"no tokenizer \(tokenizer.json, vocab.json \+ merges.txt, or tokenizer.model\).*incomplete"
    with pytest.raises(ModelError, match=no_files):
        tokenizer_module.load_release_tokenizer(tmp_path)
