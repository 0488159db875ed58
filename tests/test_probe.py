"""The image-token probe: a linear read-out of organ x kind from pooled tokens, scored on other volumes."""

import torch

from med3dvlm.data.lesions import PAIRS
from med3dvlm.data.m3d import CAP_JSON, read_cap
from med3dvlm.eval.phantom_eval import token_probe, truth_pairs
from med3dvlm.eval.probe import probe_auc, token_features


def _tokens(labels: torch.Tensor, signal: float, generator) -> torch.Tensor:
    """(N, 16, 8) tokens; label j, when present, raises channel j of one random token by ``signal``."""
    tokens = torch.randn(len(labels), 16, 8, generator=generator)
    where = torch.randint(16, (len(labels),), generator=generator)
    for j in range(labels.shape[1]):
        tokens[torch.arange(len(labels)), where, j] += signal * labels[:, j]
    return tokens


def test_probe_reads_what_the_tokens_carry_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    fit_y, test_y = ((torch.rand(n, 3, generator=g) < 0.3).float() for n in (200, 100))
    carried = probe_auc(token_features(_tokens(fit_y, 6.0, g)), fit_y, token_features(_tokens(test_y, 6.0, g)), test_y)
    absent = probe_auc(token_features(_tokens(fit_y, 0.0, g)), fit_y, token_features(_tokens(test_y, 0.0, g)), test_y)
    assert carried["macro_auc"] > 0.95 and carried["labels_scored"] == 3
    assert 0.3 < absent["macro_auc"] < 0.7


def test_probe_on_the_demo_models_tokens_runs_end_to_end(ct_dataset):
    import med3dvlm

    pipe = med3dvlm.load("demo", device="cpu")
    images = [str(c.image_path) for c in read_cap(ct_dataset / CAP_JSON, "train")]
    result = token_probe(pipe, ct_dataset, 6, images, truth_pairs(ct_dataset))
    assert list(result["per_label_auc"]) == [f"{o}/{k}" for o, k in PAIRS]
    assert result["labels_scored"] >= 1 and 0.0 <= result["macro_auc"] <= 1.0



def test_probe_regularisation_is_chosen_on_the_fitted_set_where_weak_signals_spread_over_many_channels():
    from med3dvlm.eval.classification import per_class_auc
    from med3dvlm.eval.probe import choose_l2, fit_probe, probe_scores

    g = torch.Generator().manual_seed(1)
    fit_y, test_y = ((torch.rand(n, 1, generator=g) < 0.3).float() for n in (120, 400))

    def features(y):  # 100 of 300 channels each carry a little of the label: ridge's regime
        x = torch.randn(len(y), 300, generator=g)
        x[:, :100] += 0.3 * y
        return x

    fit_x, test_x = features(fit_y), features(test_y)
    l2 = choose_l2(fit_x, fit_y)
    auc = {w: per_class_auc(test_y.numpy().astype(int), probe_scores(fit_probe(fit_x, fit_y, w), test_x).numpy())[0]
           for w in (1e-2, l2)}
    assert l2 > 1e-2 and auc[l2] > auc[1e-2]
