"""SigLIP: the pairwise sigmoid loss, its pair independence, and the two-tower model end to end."""

import math

import pytest
import torch
import torch.nn.functional as F

from med3dvlm.errors import ModelError
from med3dvlm.models.dcformer import DCFormer, DCFormerConfig
from med3dvlm.models.siglip import SigLIPModel, pairwise_sigmoid_terms, sigmoid_loss
from med3dvlm.models.text import TextConfig, build_text_model, encode_text_tokens, pool_text

TINY_VISION = DCFormerConfig("test", (1, 1, 1, 1, 1), (8, 8, 8, 8, 16), (3, 3, 3, 3), (16, 16, 16))
VOCAB = 50


def tiny_text(model_type="bert", pooling="cls"):
    if model_type == "distilbert":  # the official ClinicalBERT tower's architecture
        params = dict(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32)
    else:
        params = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32)
    return TextConfig(model_type, params, pooling)


def tiny_batch(n=3, length=7):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 1, 16, 16, 16, generator=g)
    input_ids = torch.randint(1, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 5:] = 0
    return images, input_ids, mask


def test_loss_equals_double_loop_formula():
    torch.manual_seed(0)
    img, txt = torch.randn(5, 8), torch.randn(5, 8)
    t, b = torch.tensor(7.3), torch.tensor(-4.0)
    x, y = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    total = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            logit = t * torch.dot(x[i], y[j]) + b
            total += -math.log(1.0 / (1.0 + math.exp(-z * float(logit))))
    assert sigmoid_loss(img, txt, t, b).item() == pytest.approx(total / 5, rel=1e-5)


def test_each_pair_term_is_independent_of_the_rest_of_the_batch():
    torch.manual_seed(0)
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    terms = pairwise_sigmoid_terms(img, txt, t, b)
    assert sigmoid_loss(img, txt, t, b) == pytest.approx(terms.sum().item() / 4)
    # One more pair brings a new negative for every existing image and text.
    img5, txt5 = torch.cat([img, torch.randn(1, 8)]), torch.cat([txt, torch.randn(1, 8)])
    terms5 = pairwise_sigmoid_terms(img5, txt5, t, b)
    torch.testing.assert_close(terms5[:4, :4], terms, rtol=1e-6, atol=1e-7)  # positives unchanged

    # Softmax (CLIP) couples pairs: the same positive's term moves when a negative is added.
    def clip_positive_term(i, j):
        logits = t * F.normalize(i, dim=-1) @ F.normalize(j, dim=-1).T
        return -F.log_softmax(logits, dim=1)[0, 0]

    assert abs(clip_positive_term(img5, txt5) - clip_positive_term(img, txt)) > 1e-4


def test_loss_rejects_unpaired_embeddings():
    with pytest.raises(ModelError, match="paired"):
        sigmoid_loss(torch.randn(3, 8), torch.randn(4, 8), torch.tensor(1.0), torch.tensor(0.0))


def test_model_init_keys_and_vision_tower_copy():
    model = SigLIPModel(TINY_VISION, tiny_text(), embed_dim=12)
    assert model.t_prime.item() == pytest.approx(math.log(10))
    assert model.bias.item() == pytest.approx(-10.0)
    tops = {k.split(".")[0] for k in model.state_dict()}
    assert tops == {"vision_encoder", "language_encoder", "mm_vision_proj", "mm_language_proj", "t_prime", "bias"}
    vision_state = {k.split(".", 1)[1]: v for k, v in model.state_dict().items() if k.startswith("vision_encoder.")}
    DCFormer(TINY_VISION).load_state_dict(vision_state, strict=True)  # copies into a VLM tower as is


def test_forward_backward_reaches_temperature_bias_and_both_towers():
    torch.manual_seed(0)
    model = SigLIPModel(TINY_VISION, tiny_text(), embed_dim=12)
    images, input_ids, mask = tiny_batch()
    out = model(images, input_ids, mask)
    assert out["logits"].shape == (3, 3) and out["loss"].ndim == 0
    out["loss"].backward()
    for name in ("t_prime", "bias", "mm_vision_proj.weight", "mm_language_proj.weight",
                 "vision_encoder.encoder.s0.0.0.c1.0.weight",
                 "language_encoder.embeddings.word_embeddings.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_a_few_steps_fit_a_fixed_batch():
    torch.manual_seed(0)
    model = SigLIPModel(TINY_VISION, tiny_text(), embed_dim=12)
    images, input_ids, mask = tiny_batch(n=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(images, input_ids, mask)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_match_logits_of_embeddings_made_apart_are_the_trained_logits():
    torch.manual_seed(0)
    model = SigLIPModel(TINY_VISION, tiny_text(pooling="mean"), embed_dim=12).eval()
    images, input_ids, mask = tiny_batch(n=3)
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(input_ids, mask)
        logits = model.match_logits(img[:2], txt)
        assert logits.shape == (2, 3)
        torch.testing.assert_close(logits, model(images, input_ids, mask)["logits"][:2])
        cosines = img[:2] @ txt.T  # the same ranking as the cosines, on SigLIP's trained scale
        assert torch.equal(logits.argsort(dim=1), cosines.argsort(dim=1))


def test_text_tower_distilbert_mean_pooling_and_vocab_check():
    torch.manual_seed(0)
    model = build_text_model(tiny_text("distilbert")).eval()
    _, input_ids, mask = tiny_batch(n=2)
    with torch.no_grad():
        feats = encode_text_tokens(model, input_ids, mask, "cls")
    assert feats.shape == (2, 16)
    hidden = torch.randn(2, 7, 16)
    changed = hidden.clone()
    changed[0, 5:] = 100.0  # padding positions of sample 0
    torch.testing.assert_close(pool_text(hidden, mask, "mean"), pool_text(changed, mask, "mean"))
    torch.testing.assert_close(pool_text(hidden, mask, "mean")[1], hidden[1].mean(0))
    with pytest.raises(ModelError, match="vocabulary"):
        encode_text_tokens(model, torch.tensor([[1, VOCAB]]), None, "cls")
    with pytest.raises(ModelError, match="pooling"):
        TextConfig(pooling="max")
