"""Evaluation metrics against small examples computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from med3dvlm.errors import ModelError
from med3dvlm.eval import (Meteor, accuracy, balanced_accuracy, bert_score, binary_report, bleu1, f1_score, macro_auc,
                           multilabel_report, per_class_auc, recall_at_k, roc_auc, rouge, select_threshold)
from med3dvlm.eval.wordnet import find_wordnet

# ---------------------------------------------------------------- text (sacrebleu, rouge-score, nltk, bert-score)


def test_bleu1_clipped_precision_and_brevity_penalty():
    # Papineni et al. (2002): "the" x7 against a reference holding "the" twice -> 2/7; no brevity penalty.
    assert bleu1("the the the the the the the", "the cat is on the mat") == pytest.approx(2 / 7)
    assert bleu1("the cat", "the cat is on the mat") == pytest.approx(math.exp(1 - 6 / 2))  # p1 = 1
    # 13a splits the final period off: 5 of 5 tokens match, reference 7 tokens -> BP exp(1 - 7/5).
    assert bleu1("The liver is normal.", "The liver is normal in size.") == pytest.approx(math.exp(1 - 7 / 5))
    assert bleu1("liver", "LIVER") == 0.0  # case-sensitive, as the official script's BLEU
    assert bleu1("", "the liver") == 0.0


def test_rouge1_and_rouge_l_lin_2004_examples():
    ref = "police killed the gunman"
    assert rouge("police kill the gunman", ref) == pytest.approx({"rouge1": 0.75, "rougeL": 0.75})
    # LCS "the gunman" (2 of 4); all four unigrams but "kill" match.
    assert rouge("the gunman kill police", ref) == pytest.approx({"rouge1": 0.75, "rougeL": 0.5})
    # P = 3/4, R = 3/6 -> F1 = 2PR/(P+R) = 0.6; lower case and punctuation do not matter.
    assert rouge("A b c, x", "a b c y z w")["rouge1"] == pytest.approx(0.6)


def test_meteor_exact_and_stem_stages_hand_computed():
    meteor = Meteor(find_wordnet_or_none())
    # Identical n words: P = R = 1, one chunk -> 1 - 0.5 * (1/n)^3.
    assert meteor("no focal liver lesion", "no focal liver lesion") == pytest.approx(1 - 0.5 / 4**3)
    # Swapped halves: 4 matches in 2 chunks -> 1 - 0.5 * (2/4)^3.
    assert meteor("a b c d", "c d a b") == pytest.approx(1 - 0.5 * (2 / 4) ** 3)
    # Exact "the", "enlarged" + Porter stem "kidneys"~"kidney": m = 3, P = R = 3/4, 2 chunks;
    # Fmean = PR / (0.9 P + 0.1 R) = 3/4.
    assert meteor("the kidneys are enlarged", "the kidney is enlarged") == pytest.approx(0.75 * (1 - 0.5 * (2 / 3) ** 3))
    assert meteor("x y", "a b") == 0.0 and meteor("", "a b") == 0.0


def find_wordnet_or_none():
    """Tests must not depend on a system WordNet: a run without it gets the exact+stem METEOR."""
    return None if find_wordnet() is None else find_wordnet().where


def _tiny_wordnet(folder):
    """A WordNet-format database with one noun synset {tumor, tumour, neoplasm}, as nltk reads it:
    data.* lines start with their own byte offset; index.* lines name the synset offsets."""
    folder.mkdir()
    header = "  1 tiny WordNet-format database for a test (WordNet 3.0 Copyright 2006 Princeton University)\n"
    offset = len(header.encode())
    synset = f"{offset:08d} 03 n 03 tumor 0 tumour 0 neoplasm 0 000 | an abnormal new mass of tissue  \n"
    (folder / "data.noun").write_text(header + synset)
    for pos in ("verb", "adj", "adv"):
        (folder / f"data.{pos}").write_text(header)
    index = "".join(f"{word} n 1 0 1 0 {offset:08d}  \n" for word in sorted(("tumor", "tumour", "neoplasm")))
    (folder / "index.noun").write_text(header + index)
    for pos in ("verb", "adj", "adv"):
        (folder / f"index.{pos}").write_text(header)
    for pos in ("noun", "verb", "adj", "adv"):
        (folder / f"{pos}.exc").write_text("")  # morphological exceptions: none
    return folder


def test_meteor_synonym_stage_with_a_tiny_wordnet(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = find_wordnet(_tiny_wordnet(tmp_path / "dict"))
    assert sorted(source.reader.synsets("tumour")[0].lemma_names()) == ["neoplasm", "tumor", "tumour"]
    with_wn, without = Meteor(source), Meteor(None)
    without.source, without.synonyms = None, False  # force the no-WordNet path whatever this machine has
    hyp, ref = "a tumor in the liver", "a neoplasm in the liver"
    # With synonyms: 5 of 5 in one chunk -> 1 - 0.5/125. Without: 4 of 5 in 2 chunks:
    # Fmean = 0.8, penalty 0.5 * (2/4)^3.
    assert with_wn(hyp, ref) == pytest.approx(1 - 0.5 / 5**3)
    assert without(hyp, ref) == pytest.approx(0.8 * (1 - 0.5 * (2 / 4) ** 3))
    assert with_wn.settings()["synonyms"] and not without.settings()["synonyms"]


def test_meteor_can_require_wordnet(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a WordNet dict folder"):
        find_wordnet(tmp_path)
    import med3dvlm.eval.text_metrics as tm

    original = tm.find_wordnet
    tm.find_wordnet = lambda explicit=None: None
    try:
        with pytest.raises(ModelError, match="WordNet 3.0 was not found offline"):
            Meteor(require_wordnet=True)
        assert not Meteor().synonyms and "wordnet-base" in Meteor().note
    finally:
        tm.find_wordnet = original


def test_bert_score_needs_a_local_model(tmp_path):
    with pytest.raises(ModelError, match="local encoder folder"):
        bert_score(["a"], ["a"], tmp_path / "missing")


def test_bert_score_with_a_tiny_local_encoder(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["liver", "lesion", "normal", "kidney", "cyst", "the", "is", "a", "left"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"), model_max_length=32)
    tokenizer.save_pretrained(tmp_path / "enc")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    model = BertModel(config).eval()
    model.save_pretrained(tmp_path / "enc")

    hyp, ref = "the liver is normal", "a left kidney cyst"
    same, other = bert_score([hyp, hyp], [hyp, ref], tmp_path / "enc")
    assert same == pytest.approx(1.0, abs=1e-5)
    # By hand: last-layer embeddings without [CLS]/[SEP], greedy cosine matching, F1 of P and R.
    with torch.no_grad():
        emb = [torch.nn.functional.normalize(model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0, 1:-1], dim=-1)
               for t in (hyp, ref)]
    sim = emb[0] @ emb[1].T
    p, r = sim.max(dim=1).values.mean().item(), sim.max(dim=0).values.mean().item()
    assert other == pytest.approx(2 * p * r / (p + r), abs=1e-4)


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


def test_report_errors_by_pair_tells_confusions_from_findings_out_of_nowhere():
    from med3dvlm.eval.phantom_eval import report_errors_by_pair

    truths = [{("liver", "cyst")}, {("spleen", "mass")}, set(), {("liver", "cyst")}]
    said = [{("liver", "mass")},                       # the liver's cyst read as a mass: a confusion
            {("spleen", "mass"), ("left kidney", "calcification")},  # right, plus one from nowhere
            {("liver", "mass")},                       # from nowhere
            {("liver", "cyst")}]                       # right
    errors = report_errors_by_pair(truths, said)
    assert errors == {"liver/mass": {"missed": 0, "invented": 2, "in_place_of": 1},
                      "liver/cyst": {"missed": 1, "invented": 0, "in_place_of": 0},
                      "left kidney/calcification": {"missed": 0, "invented": 1, "in_place_of": 0}}
    assert list(errors)[0] == "liver/mass"  # the pair with the most errors first
