"""Evaluation metrics: text (BLEU-1, ROUGE, METEOR, BERTScore), retrieval R@K, classification."""

from .classification import (accuracy, balanced_accuracy, binary_report, f1_score, macro_auc, multilabel_report,
                             per_class_auc, roc_auc, select_threshold)
from .retrieval import recall_at_k, retrieval_ranks
from .text_metrics import Meteor, bert_score, bleu1, rouge, sentence_scores

__all__ = [
    "Meteor", "accuracy", "balanced_accuracy", "bert_score", "binary_report", "bleu1", "f1_score", "macro_auc",
    "multilabel_report", "per_class_auc", "recall_at_k", "retrieval_ranks", "roc_auc", "rouge", "select_threshold",
    "sentence_scores",
]
