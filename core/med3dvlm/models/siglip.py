"""SigLIP contrastive model: DCFormer image tower + transformers text tower, pairwise sigmoid loss.

Attribute names follow the official Med3DVLM ``DEC_CLIP`` (``vision_encoder``,
``language_encoder``, ``mm_vision_proj``, ``mm_language_proj``, ``t_prime``, ``bias``), so its
checkpoints load with identical keys, and ``vision_encoder`` has exactly the keys of the VLM's
vision tower (copy ``vision_encoder.*`` into it after training).

Image embedding: mean of the last stage's tokens -> linear -> L2 normalise. Text embedding:
pooled last hidden state (CLS as the official tower, or mean) -> linear -> L2 normalise.

Loss (Zhai et al. 2023): with t = exp(t'), logits_ij = t <x_i, y_j> + b and z_ij = +1 on the
diagonal, -1 elsewhere, L = -(1/n) sum_ij log sigmoid(z_ij logits_ij). Each pair contributes
an independent term, so no softmax over the batch is needed. Differences from the official
code, on purpose: the paper's initialisation t' = log 10, b = -10 (official: log(1/0.07), 0);
on one device the official code multiplies by t' instead of exp(t') and does not divide by n,
and it symmetrises the logits ((L + L^T) / 2); we follow the paper in all three.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from med3dvlm.errors import ModelError
from med3dvlm.models.dcformer import DCFormer, DCFormerConfig, stage_tokens
from med3dvlm.models.text import TextConfig, build_text_model, encode_text_tokens, text_width

T_PRIME_INIT, BIAS_INIT = math.log(10.0), -10.0  # the paper's t' and b at the start of training


def pairwise_sigmoid_terms(
    img_emb: Tensor, txt_emb: Tensor, logit_scale: Tensor, logit_bias: Tensor
) -> Tensor:
    """(n, n) matrix of -log sigmoid(z_ij (t <x_i, y_j> + b)); pair (i, i) is the positive.

    ``logit_scale`` is the multiplier t = exp(t'), ``logit_bias`` is b. Embeddings are
    L2-normalised here (a no-op for already normalised ones).
    """
    if img_emb.shape != txt_emb.shape or img_emb.ndim != 2:
        raise ModelError(
            f"Sigmoid loss needs paired (n, dim) image and text embeddings, got "
            f"{tuple(img_emb.shape)} and {tuple(txt_emb.shape)}."
        )
    logits = logit_scale * F.normalize(img_emb, dim=-1) @ F.normalize(txt_emb, dim=-1).T + logit_bias
    n = logits.shape[0]
    signs = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits)


def sigmoid_loss(img_emb: Tensor, txt_emb: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """Pairwise sigmoid loss: sum over all n*n pairs divided by the batch size n."""
    terms = pairwise_sigmoid_terms(img_emb, txt_emb, logit_scale, logit_bias)
    return terms.sum() / terms.shape[0]


class SigLIPModel(nn.Module):
    """Image-text model trained with the sigmoid loss; ``embed_dim`` is the shared space width."""

    def __init__(
        self,
        vision: DCFormerConfig,
        text: TextConfig,
        embed_dim: int = 512,
        t_prime_init: float = T_PRIME_INIT,
        bias_init: float = BIAS_INIT,
    ):
        super().__init__()
        self.vision_config, self.text_config, self.embed_dim = vision, text, embed_dim
        self.vision_encoder = DCFormer(vision)
        self.language_encoder = build_text_model(text)
        self.mm_vision_proj = nn.Linear(vision.out_channels(4), embed_dim)
        self.mm_language_proj = nn.Linear(text_width(self.language_encoder), embed_dim)
        self.t_prime = nn.Parameter(torch.tensor(float(t_prime_init)))
        self.bias = nn.Parameter(torch.tensor(float(bias_init)))

    def image_features(self, images: Tensor) -> Tensor:
        """(B, 1, D, H, W) -> (B, C) last-stage tokens averaged, before the projection."""
        return stage_tokens(self.vision_encoder(images)[-1]).mean(dim=1)

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 1, D, H, W) -> (B, embed_dim), unit length."""
        return self.embed_image_features(self.image_features(images))

    def embed_image_features(self, features: Tensor) -> Tensor:
        """(B, C) pooled image features -> (B, embed_dim), unit length."""
        return F.normalize(self.mm_vision_proj(features), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) token ids -> (B, embed_dim), unit length."""
        pooled = encode_text_tokens(
            self.language_encoder, input_ids, attention_mask, self.text_config.pooling
        )
        return F.normalize(self.mm_language_proj(pooled), dim=-1)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict:
        """Returns ``loss`` and ``logits`` (B images x B texts, t <x_i, y_j> + b)."""
        img, txt = self.encode_image(images), self.encode_text(input_ids, attention_mask)
        return {"loss": sigmoid_loss(img, txt, self.t_prime.exp(), self.bias), "logits": self.match_logits(img, txt)}

    def match_logits(self, image_embeddings: Tensor, text_embeddings: Tensor) -> Tensor:
        """(N, E) and (M, E) unit embeddings -> (N, M) logits t <x_i, y_j> + b; their sigmoid is the
        probability of a match the loss trains, so retrieval can score embeddings made in batches."""
        return self.t_prime.exp() * image_embeddings @ text_embeddings.T + self.bias
