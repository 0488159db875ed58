"""The instruction-tuning stage on cached features: it must teach the LM to read the image tokens."""

import torch
from transformers import Qwen2Config

from med3dvlm.data.reports import mentioned_findings
from med3dvlm.models.dcformer import DCFormerConfig
from med3dvlm.prompts import vqa_prompt
from med3dvlm.tokenizer import train_tokenizer
from med3dvlm.train.config import TrainConfig
from med3dvlm.train.demo import read_shards, reworded_reports
from med3dvlm.train.examples import Example
from med3dvlm.train.stages import align_projector, build_vlm, cross_fitted_tokens, vlm_stage

QUESTION = "Which side is the lesion on?"


def _features(side: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Last two stages of a nano encoder on 16x32x32 (one token each): noise plus a side signal.

    The signal is strong (32 of 128 channels shifted by 2 SD) so that the outcome does not hang on
    the CPU thread count's rounding.
    """
    low, high = torch.randn(1, 128, generator=generator), torch.randn(1, 256, generator=generator)
    low[:, :32] += 2.0 * (1 if side else -1)
    return low, high


def _tiny_vlm(text: str, width: int, layers: int, heads: int, grid: tuple[int, int]):
    """A tokenizer of ``text`` and a VLM on a nano encoder of 16x32x32 with a small LM."""
    tokenizer = train_tokenizer([text] * 20, vocab_size=300)
    lm = Qwen2Config(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=64,
                     tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer, build_vlm(tokenizer, DCFormerConfig.preset("nano", (16, 32, 32)), lm, "demo", prompt_style="exact",
                                low_output_size=grid, high_output_size=grid)


def test_centred_image_tokens_carry_the_answer(tmp_path):
    torch.manual_seed(0)
    tokenizer, model = _tiny_vlm(f"{QUESTION} left right", width=64, layers=2, heads=4, grid=(4, 4))
    g = torch.Generator().manual_seed(1)
    features = {f"v{i}": _features(i % 2, g) for i in range(64)}
    prompt = vqa_prompt(model.config.num_image_tokens, QUESTION)
    examples = [Example(key, prompt, "right" if i % 2 else "left") for i, key in enumerate(features)]
    vlm_stage(model, features, examples, tokenizer,
              TrainConfig(output_dir=str(tmp_path), epochs=60, batch_size=16, lr=3e-3, warmup_steps=5, progress=False),
              train_lm=True, max_length=64, image_token_centering=1.0)

    model.eval()
    test = [_features(i % 2, g) for i in range(64)]
    with torch.no_grad():
        tokens = model.mm_projector(torch.stack([f[0] for f in test]), torch.stack([f[1] for f in test]))
    # The shared part of the image tokens stays small next to what differs between images.
    assert tokens.mean(0).norm(dim=-1).mean() < 0.5 * (tokens - tokens.mean(0)).norm(dim=-1).mean()
    ids = tokenizer([prompt] * 8, return_tensors="pt")
    out = model.generate(tokens[:8], ids["input_ids"], ids["attention_mask"], max_new_tokens=3, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    answers = [a.strip() for a in tokenizer.batch_decode(out, skip_special_tokens=True)]
    assert answers == ["left", "right"] * 4


def test_reworded_reports_state_the_same_findings_in_other_words(ct_dataset):
    written, _ = read_shards([ct_dataset])
    reworded = reworded_reports([ct_dataset], copies=2, seed=0)
    assert len(reworded) == 2 * len(written)
    by_image = {}
    for item in reworded:
        by_image.setdefault(item.image_path, []).append(item.text)
    for item in written:
        texts = by_image[item.image_path]
        assert all(mentioned_findings(t) == mentioned_findings(item.text) for t in texts)
        phase = "portal venous" if "portal venous" in item.text.lower() else "non-contrast"
        assert all(phase in t.lower() for t in texts)
    assert sum(t != item.text for item in written for t in by_image[item.image_path]) >= len(written)
    assert [r.text for r in reworded_reports([ct_dataset], copies=2, seed=0)] == [r.text for r in reworded]


def test_cross_fitted_tokens_show_the_projector_s_error_on_volumes_it_never_saw(tmp_path):
    """Targets that the features predict only in part: the projector aligned on all volumes fits their
    tokens closer than it fits unseen ones; cross-fitted tokens carry the unseen error, and the
    projector is left as it was."""
    torch.manual_seed(0)
    _, model = _tiny_vlm("left right", width=32, layers=1, heads=2, grid=(2, 2))
    g = torch.Generator().manual_seed(1)
    n, shape = 48, (model.config.num_image_tokens, 32)
    signal = torch.randn(*shape, generator=g)
    features = {f"v{i}": _features(i % 2, g) for i in range(n)}
    # a side signal the features carry, and noise of each volume's own that they cannot predict
    targets = {k: (1 if i % 2 else -1) * signal + torch.randn(*shape, generator=g) for i, k in enumerate(features)}
    before = {k: v.clone() for k, v in model.mm_projector.state_dict().items()}
    config = TrainConfig(output_dir=str(tmp_path), epochs=40, batch_size=8, lr=3e-3, warmup_steps=2, progress=False)

    crossed = cross_fitted_tokens(model, features, targets, config, folds=4)

    assert set(crossed) == set(features)
    assert all(torch.equal(v, model.mm_projector.state_dict()[k]) for k, v in before.items())
    align_projector(model, features, targets, config)
    model.eval()
    with torch.no_grad():
        own = {k: model.mm_projector(f[0][None], f[1][None])[0] for k, f in features.items()}

    def mse(tokens):
        return sum(torch.nn.functional.mse_loss(tokens[k], targets[k]).item() for k in features) / n

    assert mse(own) < 0.9 * mse(crossed)       # the projector fits its own volumes' noise
    # and the cross-fitted tokens still carry the side that the features say, nearly always
    sides = [((crossed[k] * signal).sum() > 0) == (i % 2 == 1) for i, k in enumerate(features)]
    assert sum(sides) >= 0.9 * n
