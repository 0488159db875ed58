"""Image-text retrieval: Recall@K in both directions from a similarity matrix.

``similarity[i, j]`` scores image i against text j; the matching pairs are on the diagonal (as in
the M3D retrieval benchmark: one report per volume). Ties count against the true match, so a
model that scores everything equally gets no credit.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _as_matrix(similarity) -> np.ndarray:
    if hasattr(similarity, "detach"):  # a torch tensor, possibly on the GPU
        similarity = similarity.detach().float().cpu().numpy()
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise ValueError(f"The similarity matrix must be square and non-empty, got shape {sim.shape}.")
    if not np.isfinite(sim).all():
        raise ValueError("The similarity matrix holds NaN or infinite values.")
    return sim


def retrieval_ranks(similarity) -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of the true match for each image query and for each text query."""
    sim = _as_matrix(similarity)
    true = np.diag(sim)
    image_to_text = (sim >= true[:, None]).sum(axis=1) - 1  # other texts scoring at least as high
    text_to_image = (sim >= true[None, :]).sum(axis=0) - 1
    return image_to_text, text_to_image


def recall_at_k(similarity, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Fractions in [0, 1]: ``image_to_text_R@K``, ``text_to_image_R@K`` and both median ranks (1-based)."""
    image_to_text, text_to_image = retrieval_ranks(similarity)
    scores: dict[str, float] = {}
    for name, ranks in (("image_to_text", image_to_text), ("text_to_image", text_to_image)):
        for k in ks:
            scores[f"{name}_R@{k}"] = float(np.mean(ranks < k))
        scores[f"{name}_median_rank"] = float(np.median(ranks) + 1)
    return scores
