"""Evaluation metrics against small examples computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from med3dvlm.errors import ModelError
from med3dvlm.eval import (accuracy, balanced_accuracy, bert_score, binary_report, corpus_bleu, f1_score, macro_auc,
                           meteor, multilabel_report, per_class_auc, recall_at_k, roc_auc, rouge_l, select_threshold,
                           sentence_bleu, sentence_meteor, sentence_rouge_l, text_metrics, tokenize)
from med3dvlm.eval.text_metrics import simple_stem

# ---------------------------------------------------------------- text


def test_tokenize_keeps_numbers_and_hyphenated_words():
    words = ["a", "3.5", "cm", "non-contrast", "lesion", "left", "lobe"]
    assert tokenize("A 3.5 cm non-contrast lesion, LEFT lobe.") == words


def test_bleu_identical_is_one_and_disjoint_is_zero():
    text = "the liver shows a small hypodense lesion"
    assert sentence_bleu(text, text) == pytest.approx([1.0] * 4)
    other = "no acute findings here today"
    assert corpus_bleu([text, other], [text, other]) == pytest.approx([1.0] * 4)
    assert corpus_bleu(["a b c d"], ["e f g h"]) == [0.0] * 4


def test_bleu_clipped_unigram_precision_papineni_example():
    # Papineni et al. (2002): "the" x7 against a reference holding "the" twice -> 2/7; no brevity penalty.
    bleu = sentence_bleu("the the the the the the the", "the cat is on the mat", smoothing="none")
    assert bleu[0] == pytest.approx(2 / 7)


def test_bleu_brevity_penalty_and_multiple_references():
    bleu = sentence_bleu("the cat", "the cat is on the mat", max_n=2, smoothing="none")
    assert bleu == pytest.approx([math.exp(-2), math.exp(-2)])  # p1 = p2 = 1, BP = exp(1 - 6/2)
    # Each unigram found in some reference; closest reference length 2 -> no penalty; no bigram matches.
    assert sentence_bleu("the cat", ["the dog", "a cat"], max_n=2, smoothing="none") == pytest.approx([1.0, 0.0])


def test_corpus_bleu_pools_counts_and_smoothing_options():
    # Unigrams 3/4 and bigrams 1/2 pooled over both pairs -> BLEU-2 = sqrt(3/4 * 1/2).
    assert corpus_bleu(["a b", "c d"], ["a b", "c e"], max_n=2) == pytest.approx([0.75, math.sqrt(0.375)])
    # No 2-gram match: plain BLEU-2 is 0, epsilon uses 0.1/1, add-one uses (0+1)/(1+1).
    assert sentence_bleu("a c", "a b", max_n=2, smoothing="none")[1] == 0.0
    assert sentence_bleu("a c", "a b", max_n=2, smoothing="epsilon")[1] == pytest.approx(math.sqrt(0.5 * 0.1))
    assert sentence_bleu("a c", "a b", max_n=2, smoothing="add-one")[1] == pytest.approx(math.sqrt(0.5 * 0.5))
    with pytest.raises(ValueError, match="smoothing"):
        sentence_bleu("a", "a", smoothing="magic")


def test_rouge_l_lin_2004_examples():
    ref = "police killed the gunman"
    assert sentence_rouge_l("police kill the gunman", ref) == pytest.approx(0.75)  # LCS 3 of 4 both ways
    assert sentence_rouge_l("the gunman kill police", ref) == pytest.approx(0.5)  # LCS "the gunman"
    assert sentence_rouge_l("police kill the gunman", [ref, "police kill the gunman"]) == 1.0
    assert rouge_l(["police kill the gunman", "xyz"], [ref, ref]) == pytest.approx(0.375)
    # beta weights recall: P = 3/4, R = 3/6 -> F(beta=2) = 5 * P * R / (R + 4P)
    assert sentence_rouge_l("a b c x", "a b c y z w", beta=2.0) == pytest.approx(5 * 0.75 * 0.5 / (0.5 + 3.0))


def test_simple_stemmer():
    pairs = [("lesions", "lesion"), ("masses", "mass"), ("opacities", "opac"), ("opacity", "opac"),
             ("enlarged", "enlarg"), ("enlargement", "enlarg"), ("enlarge", "enlarg"), ("kidneys", "kidney"),
             ("stopped", "stop"), ("is", "is"), ("thus", "thus")]
    assert [(w, simple_stem(w)) for w, _ in pairs] == pairs


def test_meteor_hand_computed():
    # Identical n words: P = R = 1, one chunk -> 1 - 0.5 * (1/n)^3.
    assert sentence_meteor("no focal liver lesion", "no focal liver lesion") == pytest.approx(1 - 0.5 / 4**3)
    # Swapped halves: 4 matches in 2 chunks -> 1 - 0.5 * (2/4)^3.
    assert sentence_meteor("a b c d", "c d a b") == pytest.approx(0.9375)
    # Exact "the", "enlarged" + stem "kidneys"~"kidney": m = 3, P = R = 3/4, 2 chunks.
    hyp, ref = "the kidneys are enlarged", "the kidney is enlarged"
    assert sentence_meteor(hyp, ref) == pytest.approx(0.75 * (1 - 0.5 * (2 / 3) ** 3))
    # Without stemming: m = 2, P = R = 1/2, 2 chunks -> 0.5 * (1 - 0.5).
    assert sentence_meteor(hyp, ref, stemming=False) == pytest.approx(0.25)
    assert sentence_meteor("x y", "a b") == 0.0
    assert meteor([hyp, "a b c d"], [[ref, "unrelated"], "c d a b"]) == pytest.approx(
        (0.75 * (1 - 0.5 * (2 / 3) ** 3) + 0.9375) / 2)


def test_text_metrics_bundle_and_input_checks():
    scores = text_metrics(["the liver is normal"], ["the liver is normal"])
    assert set(scores) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "meteor"}
    assert scores["bleu4"] == pytest.approx(1.0) and scores["rouge_l"] == 1.0
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        rouge_l(["a", "b"], ["a"])
    with pytest.raises(TypeError):
        meteor("a b", "a b")


def test_bert_score_needs_a_local_model(tmp_path):
    with pytest.raises(ModelError, match="local encoder folder"):
        bert_score(["a"], ["a"], None)
    with pytest.raises(ModelError, match="local encoder folder"):
        bert_score(["a"], ["a"], tmp_path / "missing")


def test_bert_score_with_a_tiny_local_encoder(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["liver", "lesion", "normal", "kidney", "cyst", "the", "is", "a", "left"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "enc")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(tmp_path / "enc")

    same = bert_score(["the liver is normal"], ["the liver is normal"], tmp_path / "enc")
    assert same["f1"][0] == pytest.approx(1.0, abs=1e-5)
    other = bert_score(["the liver is normal", "a left kidney cyst"], [["a left kidney cyst", "the liver is normal"],
                                                                     "the liver is normal"], tmp_path / "enc")
    assert other["f1"][0] == pytest.approx(1.0, abs=1e-5)  # best of two references
    assert other["f1"][1] < 0.999 and other["precision"][1] < 0.999


# ---------------------------------------------------------------- retrieval


def test_recall_at_k_perfect_ties_and_hand_example():
    perfect = recall_at_k(torch.eye(4), ks=(1,))
    assert perfect["image_to_text_R@1"] == perfect["text_to_image_R@1"] == 1.0
    ties = recall_at_k(np.ones((3, 3)), ks=(1, 3))  # equal scores get no credit until K covers all
    assert (ties["image_to_text_R@1"], ties["image_to_text_R@3"]) == (0.0, 1.0)
    sim = np.array([[0.9, 0.1, 0.0],
                    [0.8, 0.7, 0.0],
                    [0.1, 0.2, 0.3]])
    # image 1 (row) prefers text 0: image ranks 1, 2, 1; every text (column) ranks its own image first
    r = recall_at_k(sim, ks=(1, 2))
    assert r["image_to_text_R@1"] == pytest.approx(2 / 3) and r["image_to_text_R@2"] == 1.0
    assert r["text_to_image_R@1"] == 1.0 and r["image_to_text_median_rank"] == 1.0
    r = recall_at_k(sim.T, ks=(1,))  # transposing swaps the two directions
    assert (r["image_to_text_R@1"], r["text_to_image_R@1"]) == (1.0, pytest.approx(2 / 3))
    with pytest.raises(ValueError, match="square"):
        recall_at_k(np.ones((2, 3)))


# ---------------------------------------------------------------- classification


def test_auc_perfect_inverted_tied_and_hand_examples():
    y = [0, 0, 1, 1]
    assert roc_auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert roc_auc(y, [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)  # one tied pair counts 1/2
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_per_class_and_macro_auc():
    labels = np.array([0, 1, 2, 1])
    scores = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.3, 0.4, 0.3]])
    # class 0: perfect; class 1: positives 0.7, 0.4 vs negatives 0.1, 0.6 -> 3/4; class 2: 0.3 vs 0.1,0.1,0.3 -> 2.5/3
    assert per_class_auc(labels, scores) == pytest.approx([1.0, 0.75, 2.5 / 3])
    multilabel = np.array([[1, 0], [0, 0], [1, 0]])
    assert macro_auc(multilabel, np.array([[0.9, 0.1], [0.1, 0.2], [0.8, 0.3]])) == 1.0  # column 2 undefined, skipped


def test_accuracy_balanced_accuracy_and_f1():
    y, p = [1, 1, 1, 0], [1, 0, 0, 0]
    assert accuracy(y, p) == 0.5
    assert balanced_accuracy(y, p) == pytest.approx((1 / 3 + 1) / 2)
    assert f1_score(y, p) == pytest.approx(2 * 1 / (2 + 0 + 2))
    y3, p3 = [0, 1, 2, 2], [0, 2, 2, 1]
    # class 0: F1 1; class 1: 0; class 2: tp 1 fp 1 fn 1 -> 0.5; micro = accuracy here
    assert f1_score(y3, p3, average="macro") == pytest.approx(0.5)
    assert f1_score(y3, p3, average="micro") == pytest.approx(0.5)
    ml_true, ml_pred = np.array([[1, 0], [1, 1]]), np.array([[1, 0], [0, 1]])
    assert f1_score(ml_true, ml_pred, average="macro") == pytest.approx((2 / 3 + 1) / 2)
    assert f1_score([0, 0], [0, 0]) == 0.0


def test_threshold_selection_f1_and_youden():
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    # F1 best at s >= 0.35 (tp 2, fp 1): midway to the next lower score 0.1.
    assert select_threshold(y, s, "f1") == pytest.approx(0.225)
    # Youden J = 0.5 at 0.8 and at 0.35: the higher wins, midway to 0.4.
    assert select_threshold(y, s, "youden") == pytest.approx(0.6)
    both = select_threshold(np.array([y, y]).T, np.array([s, s]).T, "f1")
    assert both == pytest.approx([0.225, 0.225])
    with pytest.raises(ValueError, match="both classes"):
        select_threshold([0, 0], [0.1, 0.2], "youden")


def test_binary_and_multilabel_reports():
    rep = binary_report([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], threshold=0.225)
    assert rep == pytest.approx({"auc": 0.75, "accuracy": 0.75, "sensitivity": 1.0, "specificity": 0.5,
                                 "balanced_accuracy": 0.75, "f1": 0.8, "threshold": 0.225})
    y = np.array([[1, 0], [0, 0], [1, 1], [0, 1]])
    s = np.array([[0.9, 0.2], [0.2, 0.3], [0.8, 0.9], [0.4, 0.1]])
    full = multilabel_report(y, s, thresholds=[0.5, 0.5], class_names=["mass", "cyst"])
    assert full["mass"]["accuracy"] == 1.0 and full["cyst"]["sensitivity"] == 0.5
    assert full["macro"]["accuracy"] == pytest.approx((1.0 + 0.75) / 2)
