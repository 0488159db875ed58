"""Med3DVLM wrapper: image-token insertion, loss masking, generation, save/load and its errors.

Tiny but real components: DCFormer "nano" on 16x32x32 volumes, the real mixer projector, and
transformers' own Qwen2ForCausalLM (hidden 64, 2 layers) with a tokenizer trained on a few reports.
"""

import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from med3dvlm.loading import load_bundle, save_bundle
from med3dvlm.errors import ModelError
from med3dvlm.models.dcformer import DCFormerConfig
from med3dvlm.models.projector import ProjectorConfig
from med3dvlm.models.vlm import Med3DVLM, Med3DVLMConfig
from med3dvlm.prompts import report_prompt, vqa_prompt
from med3dvlm.tokenizer import image_token_id, train_tokenizer

REPORTS = [
    "The liver is enlarged with a hypodense lesion in segment seven.",
    "No focal lesion. The kidneys are normal in size and shape.",
    "A mass in the left kidney; no lymphadenopathy. Is there a cyst?",
    "Mild pleural effusion on the right. The spleen is unremarkable.",
]
INPUT_SIZE = (16, 32, 32)
N_IMG = 10  # 6 low-stream + 4 high-stream tokens


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(REPORTS * 3, vocab_size=320)


def make_config(tokenizer, prompt_style="med3dvlm", tie=True):
    vision = DCFormerConfig.preset("nano", INPUT_SIZE)
    projector = ProjectorConfig.for_encoder(vision, 64, low_output_size=(8, 6), high_output_size=(4, 4))
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=tie, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return Med3DVLMConfig(text, vision, projector, image_token_id=image_token_id(tokenizer),
                          prompt_style=prompt_style)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return Med3DVLM(make_config(tokenizer)).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(2, 1, *INPUT_SIZE, generator=torch.Generator().manual_seed(1))


def encode(tokenizer, prompts):
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


class EmbedsRecorder:
    """Captures the inputs_embeds the language model receives."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.language_model.model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append(kwargs["inputs_embeds"].detach().clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def greedy(model, image_tokens, ids, mask, tokenizer, **kwargs):
    kwargs = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id, **kwargs}
    return model.generate(image_tokens, ids, mask, **kwargs)


# ----- image-token insertion ---------------------------------------------------------------------

def test_official_insertion_keeps_first_placeholder_and_drops_first_question_token(model, tokenizer, pixels):
    ids, mask = encode(tokenizer, [report_prompt(N_IMG, "The liver is normal.")])
    assert ids[0, :N_IMG].eq(image_token_id(tokenizer)).all() and ids.shape[1] > N_IMG + 1
    image = model.encode_images(pixels[:1])
    with torch.no_grad(), EmbedsRecorder(model) as rec:
        model(ids, mask, image_tokens=image)
    embeds, table = rec.calls[0][0], model.language_model.get_input_embeddings()(ids)[0]
    assert embeds.shape == table.shape
    torch.testing.assert_close(embeds[0], table[0])  # first <im_patch> embedding kept at position 0
    torch.testing.assert_close(embeds[1:N_IMG + 1], image[0])  # image at positions 1..N
    torch.testing.assert_close(embeds[N_IMG + 1:], table[N_IMG + 1:])  # first question token dropped
    # The official expression, verbatim.
    official = torch.cat([table[None, :1], image, table[None, N_IMG + 1:]], dim=1)
    torch.testing.assert_close(rec.calls[0], official)


def test_exact_style_matches_official_code_for_bos_tokenizers(tokenizer, pixels):
    torch.manual_seed(0)
    exact = Med3DVLM(make_config(tokenizer, prompt_style="exact")).eval()
    bos = tokenizer.eos_token_id  # any token in front stands for a BOS
    ids = torch.tensor([[bos] + tokenizer.encode(vqa_prompt(N_IMG, "Is there a cyst?"))])
    image = exact.encode_images(pixels[1:])
    embeds = exact.build_inputs_embeds(ids, image)
    table = exact.language_model.get_input_embeddings()(ids)
    official = torch.cat([table[:, :1], image, table[:, N_IMG + 1:]], dim=1)
    torch.testing.assert_close(embeds, official)


def test_left_padded_batch_inserts_per_row_and_scores_like_single_rows(model, tokenizer, pixels):
    prompts = [report_prompt(N_IMG, "Describe."), vqa_prompt(N_IMG, "Is there a mass in the left kidney?")]
    ids, mask = encode(tokenizer, prompts)
    pad = int((mask[0] == 0).sum())
    assert pad > 0 and mask[1].all()  # row 0 is left padded
    image = model.encode_images(pixels)
    embeds = model.build_inputs_embeds(ids, image)
    torch.testing.assert_close(embeds[0, pad + 1:pad + N_IMG + 1], image[0])
    torch.testing.assert_close(embeds[1, 1:N_IMG + 1], image[1])
    with torch.no_grad():
        batched = model(ids, mask, image_tokens=image).logits
        for row in range(2):
            real = mask[row].bool()
            single = model(ids[row:row + 1, real], image_tokens=image[row:row + 1]).logits
            torch.testing.assert_close(batched[row, real], single[0], atol=1e-4, rtol=1e-4)


def test_batched_greedy_generation_equals_one_by_one(model, tokenizer, pixels):
    prompts = [report_prompt(N_IMG, "Describe."), vqa_prompt(N_IMG, "Is there a mass in the left kidney?")]
    ids, mask = encode(tokenizer, prompts)
    image = model.encode_images(pixels)
    together = greedy(model, image, ids, mask, tokenizer)
    for row, prompt in enumerate(prompts):
        one_ids, one_mask = encode(tokenizer, [prompt])
        alone = greedy(model, image[row:row + 1], one_ids, one_mask, tokenizer)
        assert together[row, :alone.shape[1]].tolist() == alone[0].tolist()


def test_prompt_without_placeholders_is_refused(model, tokenizer, pixels):
    image = model.encode_images(pixels[:1])
    ids, _ = encode(tokenizer, ["Describe the findings."])
    with pytest.raises(ValueError, match="placeholders"):
        model.build_inputs_embeds(ids, image)
    ids, _ = encode(tokenizer, [report_prompt(N_IMG - 1, "Describe the findings.")])
    with pytest.raises(ValueError, match="consecutive"):
        model.build_inputs_embeds(ids, image)


# ----- loss ----------------------------------------------------------------------------------------

def test_loss_is_finite_masked_and_trains_the_projector(model, tokenizer, pixels):
    prompt, answer = report_prompt(N_IMG, "Describe."), " The spleen is unremarkable."
    ids, mask = encode(tokenizer, [prompt + answer + tokenizer.eos_token, prompt + " No lesion."])
    labels = ids.clone()  # deliberately unmasked: the model must ignore image and pad positions itself
    model.zero_grad()
    out = model(ids, mask, labels=labels, pixels=pixels)
    assert torch.isfinite(out.loss)
    # Reference: mean next-token cross-entropy, skipping pads, placeholders and the image-covered position.
    ref_labels = ids.masked_fill(mask == 0, -100)
    for row in range(2):
        start = int((mask[row] == 0).sum())
        ref_labels[row, start:start + N_IMG + 1] = -100
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                            ref_labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    assert model.mm_projector.low_mixer[0].mlp1.mm_projector[0].weight.grad.abs().sum() > 0
    assert model.vision_tower.encoder.s4[0].scale.grad is not None
    model.zero_grad()


def test_loss_on_answer_only(model, tokenizer, pixels):
    prompt = report_prompt(N_IMG, "Describe.")
    ids, mask = encode(tokenizer, [prompt + " The liver is enlarged."])
    labels = ids.clone()
    labels[:, :len(tokenizer.encode(prompt))] = -100
    with torch.no_grad():
        out = model(ids, mask, labels=labels, pixels=pixels[:1])
    answer = ids[0, len(tokenizer.encode(prompt)):]
    logp = out.logits[0, len(tokenizer.encode(prompt)) - 1:-1].log_softmax(-1)
    expected = -logp.gather(1, answer[:, None]).mean()
    torch.testing.assert_close(out.loss, expected)


# ----- generation ---------------------------------------------------------------------------------

def test_streamed_greedy_text_equals_non_streamed(model, tokenizer, pixels):
    ids, mask = encode(tokenizer, [report_prompt(N_IMG, "Describe the findings.")])
    image = model.encode_images(pixels[:1])
    plain = greedy(model, image, ids, mask, tokenizer, max_new_tokens=8)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=30)
    worker = threading.Thread(target=greedy, args=(model, image, ids, mask, tokenizer),
                              kwargs={"max_new_tokens": 8, "streamer": streamer})
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert len(pieces) > 1
    assert "".join(pieces) == tokenizer.decode(plain[0], skip_special_tokens=True)


def test_precomputed_image_tokens_equal_pixels_and_skip_the_encoder(model, tokenizer, pixels):
    ids, mask = encode(tokenizer, [vqa_prompt(N_IMG, "Is there a cyst?")])
    from_pixels = greedy(model, None, ids, mask, tokenizer, pixels=pixels[:1])
    cached = model.encode_images(pixels[:1])
    calls = []
    handle = model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        from_cache = greedy(model, cached, ids, mask, tokenizer)
    finally:
        handle.remove()
    assert calls == []
    assert from_cache.tolist() == from_pixels.tolist()
    with pytest.raises(ValueError, match="exactly one"):
        greedy(model, cached, ids, mask, tokenizer, pixels=pixels[:1])


def test_stopping_criteria_stop_generation(model, tokenizer, pixels):
    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 3, dtype=torch.bool)

    ids, mask = encode(tokenizer, [report_prompt(N_IMG, "Describe.")])
    image = model.encode_images(pixels[:1])
    out = greedy(model, image, ids, mask, tokenizer, max_new_tokens=20, min_new_tokens=20,
                 stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert out.shape[1] == 3


# ----- save / load ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip_identical_logits(tokenizer, pixels, tmp_path, tie):
    torch.manual_seed(2)
    original = Med3DVLM(make_config(tokenizer, tie=tie)).eval()
    original.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert ("language_model.lm_head.weight" in stored) == (not tie)
    loaded = Med3DVLM.from_pretrained(tmp_path)
    lm = loaded.language_model
    assert (lm.lm_head.weight is lm.get_input_embeddings().weight) == tie
    assert loaded.config.to_dict() == original.config.to_dict()
    ids, mask = encode(tokenizer, [vqa_prompt(N_IMG, "Is the spleen enlarged?")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, pixels=pixels[:1]).logits,
                                   original(ids, mask, pixels=pixels[:1]).logits, atol=0, rtol=0)


def test_load_casts_floats_to_dtype_only(model, tmp_path):
    model.save_pretrained(tmp_path)
    half = Med3DVLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.vision_tower.encoder.s1[0].dwconv.c1[1].num_batches_tracked.dtype == torch.int64


def test_bundle_round_trip_and_tokenizer_mismatch(model, tokenizer, tmp_path):
    save_bundle(tmp_path / "ok", model, tokenizer)
    loaded, loaded_tok = load_bundle(tmp_path / "ok")
    assert loaded_tok.encode(REPORTS[0]) == tokenizer.encode(REPORTS[0])
    assert loaded.config.image_token_id == image_token_id(loaded_tok)
    other = train_tokenizer(["completely different words here"] * 3 + REPORTS, vocab_size=400)
    save_bundle(tmp_path / "bad", model, other)
    with pytest.raises(ModelError, match="does not belong to its model"):
        load_bundle(tmp_path / "bad")


def edit_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_wrong_shape_missing_and_unexpected_tensors_are_named(model, tmp_path):
    model.save_pretrained(tmp_path)
    key = "mm_projector.high_mixer.1.ln2.weight"
    edit_weights(tmp_path, lambda t: t.__setitem__(key, torch.zeros(3)))
    with pytest.raises(ModelError, match=rf"1 wrong shape \({key} \(3,\) in file vs \(\d+,\) in model\)"):
        Med3DVLM.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    edit_weights(tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("vision_tower.encoder.s4")])
    missing = r"model.safetensors .*\d+ missing \(vision_tower.encoder.s4.* and \d+ more\)"
    with pytest.raises(ModelError, match=missing):
        Med3DVLM.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    edit_weights(tmp_path, lambda t: t.__setitem__("extra.weight", torch.zeros(1)))
    with pytest.raises(ModelError, match=r"1 unexpected \(extra.weight\)"):
        Med3DVLM.from_pretrained(tmp_path)


def test_corrupt_or_missing_files_raise_model_error(model, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        Med3DVLM.from_pretrained(tmp_path / "nowhere")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=rf"{weights}.*corrupted or truncated"):
        Med3DVLM.from_pretrained(tmp_path)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match="corrupted or truncated"):
        Med3DVLM.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(ModelError, match="model.safetensors is missing"):
        Med3DVLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ModelError, match="config.json cannot be read"):
        Med3DVLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelError, match="has no config.json"):
        Med3DVLM.from_pretrained(tmp_path)


def test_foreign_or_inconsistent_config_is_refused(tokenizer, tmp_path):
    config = make_config(tokenizer)
    data = config.to_dict()
    with pytest.raises(ModelError, match="'vlm_qwen'"):
        Med3DVLMConfig.from_dict({**data, "model_type": "vlm_qwen"})
    with pytest.raises(ModelError, match="projector width 64 differs from the LM's 96"):
        Med3DVLMConfig(Qwen2Config(vocab_size=400, hidden_size=96, num_attention_heads=4),
                       config.vision_config, config.projector_config, image_token_id=2)
