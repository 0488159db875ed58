"""Classification metrics for closed VQA and abnormality detection (MedMAP's nine findings).

NumPy only. ``y_true`` holds 0/1 labels (binary, or an (N, C) multi-label matrix) or class
indices (multi-class); ``scores`` are probabilities or any monotone score. AUC is rank-based
(Mann-Whitney) with tied scores sharing their average rank, so ties count one half.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _arrays(y_true, other) -> tuple[np.ndarray, np.ndarray]:
    y, o = np.asarray(y_true), np.asarray(other)
    if len(y) != len(o):
        raise ValueError(f"{len(y)} labels but {len(o)} predictions or scores.")
    if len(y) == 0:
        raise ValueError("No samples to evaluate.")
    return y, o


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def accuracy(y_true, y_pred) -> float:
    y, p = _arrays(y_true, y_pred)
    return float(np.mean(y == p))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; a group of equal values gets the mean of the ranks it spans."""
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    new_group = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + 1 + ends) / 2.0)[np.cumsum(new_group) - 1]
    return ranks


def roc_auc(y_true, scores) -> float:
    """Binary ROC AUC; NaN when only one class is present (AUC is undefined then)."""
    y, s = _arrays(y_true, scores)
    y, s = y.astype(bool).ravel(), s.astype(np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _one_vs_rest(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) 0/1 targets and (N, C) scores from multi-label targets or class indices."""
    y, s = _arrays(y_true, scores)
    if s.ndim != 2:
        raise ValueError(f"Per-class metrics need (N, C) scores, got shape {s.shape}.")
    if y.ndim == 1:
        y = (y[:, None] == np.arange(s.shape[1])[None, :]).astype(int)
    if y.shape != s.shape:
        raise ValueError(f"Labels of shape {y.shape} do not match scores of shape {s.shape}.")
    return y, s


def per_class_auc(y_true, scores) -> np.ndarray:
    """One-vs-rest AUC per column; NaN for a class with no positives or no negatives."""
    y, s = _one_vs_rest(y_true, scores)
    return np.array([roc_auc(y[:, c], s[:, c]) for c in range(s.shape[1])])


def macro_auc(y_true, scores) -> float:
    """Mean of the defined per-class AUCs (NaN if none is defined)."""
    return _nanmean(per_class_auc(y_true, scores))


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the classes present in ``y_true`` (sensitivity+specificity over 2 for binary)."""
    y, p = _arrays(y_true, y_pred)
    return float(np.mean([np.mean(p[y == c] == c) for c in np.unique(y)]))


def _f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def f1_score(y_true, y_pred, average: str = "binary") -> float:
    """F1: ``binary`` (positive label 1), or ``macro``/``micro`` over classes or multi-label columns.

    A class never present nor predicted scores 0 (no zero-division warnings here).
    """
    y, p = _arrays(y_true, y_pred)
    if average == "binary":
        y, p = y.astype(bool).ravel(), p.astype(bool).ravel()
        return _f1(np.sum(y & p), np.sum(~y & p), np.sum(y & ~p))
    if average not in ("macro", "micro"):
        raise ValueError(f"average must be 'binary', 'macro' or 'micro', not {average!r}.")
    if y.ndim == 2:  # multi-label: columns are the classes
        cols = [(y[:, c].astype(bool), p[:, c].astype(bool)) for c in range(y.shape[1])]
    else:
        cols = [(y == c, p == c) for c in np.union1d(y, p)]
    counts = np.array([[np.sum(t & q), np.sum(~t & q), np.sum(t & ~q)] for t, q in cols], dtype=np.float64)
    if average == "micro":
        return _f1(*counts.sum(axis=0))
    return float(np.mean([_f1(*row) for row in counts]))


def select_threshold(y_true, scores, criterion: str = "f1") -> float | np.ndarray:
    """Threshold maximising F1 or Youden's J (sensitivity + specificity - 1) on validation data.

    Predict positive when ``score >= threshold``. The value returned lies midway between the
    chosen score and the next lower one, so it separates the same validation samples while
    sitting in the gap. Among equal optima the highest threshold (fewest positives) wins.
    A 2-D input gives one threshold per column.
    """
    y, s = _arrays(y_true, scores)
    if s.ndim == 2:
        return np.array([select_threshold(y[:, c], s[:, c], criterion) for c in range(s.shape[1])])
    if criterion not in ("f1", "youden"):
        raise ValueError(f"criterion must be 'f1' or 'youden', not {criterion!r}.")
    y, s = y.astype(bool), s.astype(np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or (criterion == "youden" and n_neg == 0):
        raise ValueError("Threshold selection needs validation samples of both classes.")
    order = np.argsort(-s, kind="mergesort")
    ordered, hits = s[order], y[order]
    last_of_value = np.r_[ordered[1:] != ordered[:-1], True]
    tp = np.cumsum(hits)[last_of_value]
    fp = np.cumsum(~hits)[last_of_value]
    thresholds = ordered[last_of_value]  # descending: predict positive for s >= thresholds[i]
    if criterion == "f1":
        gain = 2 * tp / (2 * tp + fp + (n_pos - tp))
    else:
        gain = tp / n_pos - fp / n_neg
    best = int(np.argmax(gain))
    if best + 1 < len(thresholds):
        return float((thresholds[best] + thresholds[best + 1]) / 2)
    return float(thresholds[best])


def binary_report(y_true, scores, threshold: float) -> dict[str, float]:
    """AUC plus the thresholded metrics of one binary task."""
    y, s = _arrays(y_true, scores)
    y, pred = y.astype(bool), np.asarray(s, dtype=np.float64) >= threshold
    tp, fp = np.sum(y & pred), np.sum(~y & pred)
    fn, tn = np.sum(y & ~pred), np.sum(~y & ~pred)
    sensitivity = tp / (tp + fn) if tp + fn else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    return {
        "auc": roc_auc(y, s),
        "accuracy": float(np.mean(y == pred)),
        "sensitivity": float(sensitivity),
        "specificity": float(specificity),
        "balanced_accuracy": _nanmean([sensitivity, specificity]),
        "f1": _f1(tp, fp, fn),
        "threshold": float(threshold),
    }


def multilabel_report(y_true, scores, thresholds: float | Sequence[float] = 0.5,
                      class_names: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Per-class :func:`binary_report` for (N, C) multi-label data, plus their ``macro`` mean.

    The macro mean skips undefined values (AUC of a class with one label value).
    """
    y, s = _one_vs_rest(y_true, scores)
    n_classes = s.shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
    cuts = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (n_classes,))
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names for {n_classes} score columns.")
    report = {name: binary_report(y[:, c], s[:, c], cuts[c]) for c, name in enumerate(names)}
    keys = next(iter(report.values())).keys()
    report["macro"] = {key: _nanmean([report[n][key] for n in names]) for key in keys}
    return report
