"""Evaluation metrics: text (BLEU, ROUGE-L, METEOR, BERTScore), retrieval R@K, classification."""

from .classification import (accuracy, balanced_accuracy, binary_report, f1_score, macro_auc, multilabel_report,
                             per_class_auc, roc_auc, select_threshold)
from .retrieval import recall_at_k, retrieval_ranks
from .text_metrics import (bert_score, corpus_bleu, meteor, rouge_l, sentence_bleu, sentence_meteor,
                           sentence_rouge_l, text_metrics, tokenize)

__all__ = [
    "accuracy", "balanced_accuracy", "bert_score", "binary_report", "corpus_bleu", "f1_score", "macro_auc",
    "meteor", "multilabel_report", "per_class_auc", "recall_at_k", "retrieval_ranks", "roc_auc", "rouge_l",
    "select_threshold", "sentence_bleu", "sentence_meteor", "sentence_rouge_l", "text_metrics", "tokenize",
]
