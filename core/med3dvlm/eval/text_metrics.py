"""Text metrics of generated reports and open answers, computed by the maintained libraries.

As the Med3DVLM evaluation reports them (its scripts call Hugging Face ``evaluate`` per sample
and average): BLEU-1 (sacrebleu, 13a tokens, no smoothing, brevity penalty), ROUGE-1 and ROUGE-L
F1 (rouge-score, no stemming), METEOR (nltk: exact, Porter stem, then WordNet synonym matches;
alpha 0.9, beta 3, gamma 0.5) and BERTScore F1 (bert-score, no IDF, no baseline rescaling).
One reference per hypothesis, as in M3D-Cap and M3D-VQA. Scores are fractions in [0, 1].

METEOR needs WordNet for its synonym stage. Without it (see ``wordnet.MISSING``) it runs the
exact and stem stages only, and ``Meteor.synonyms`` is False so that summaries can say so: such
scores are a lower bound of the paper's METEOR, never to be set beside it unlabelled.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from ..errors import ModelError
from .wordnet import MISSING, WordNetSource, find_wordnet

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@lru_cache(maxsize=1)
def _bleu1():
    from sacrebleu.metrics import BLEU

    # effective_order changes nothing at order 1; it only silences sacrebleu's sentence-level warning.
    return BLEU(max_ngram_order=1, smooth_method="none", tokenize="13a", effective_order=True)


def bleu1(hypothesis: str, reference: str) -> float:
    """Sentence BLEU-1: clipped unigram precision times the brevity penalty exp(1 - r/h) when h < r."""
    return _bleu1().sentence_score(hypothesis.strip(), [reference.strip()]).score / 100.0


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def rouge(hypothesis: str, reference: str) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F1 (rouge-score: lower case, non-alphanumerics split words)."""
    scores = _rouge().score(reference, hypothesis)  # rouge-score takes (target, prediction)
    return {"rouge1": scores["rouge1"].fmeasure, "rougeL": scores["rougeL"].fmeasure}


class _NoSynonyms:
    """Stands in for WordNet: no word has synonyms, so METEOR keeps its exact and stem stages."""

    def synsets(self, word):
        return []


class Meteor:
    """Sentence METEOR as nltk computes it (``meteor_score``), tokenised as Hugging Face ``evaluate``
    does (nltk ``word_tokenize``; without nltk's punkt data: sentences split at . ! ? then the same
    Treebank word tokenizer, which differs only on abbreviations inside a text)."""

    def __init__(self, wordnet: WordNetSource | str | Path | None = None, *, require_wordnet: bool = False):
        source = wordnet if isinstance(wordnet, WordNetSource) else find_wordnet(wordnet)
        if source is None and require_wordnet:
            raise ModelError(MISSING)
        self.source = source
        self.synonyms = source is not None
        self.note = f"WordNet from {source.where}" if source else MISSING
        self._tokenize, self.tokenizer = self._word_tokenizer()

    @staticmethod
    def _word_tokenizer():
        import nltk
        from nltk.tokenize import NLTKWordTokenizer

        try:
            nltk.data.find("tokenizers/punkt_tab/english/")
            return nltk.word_tokenize, "nltk word_tokenize (punkt)"
        except LookupError:
            words = NLTKWordTokenizer()
            return (lambda text: [w for s in _SENTENCE_END.split(text.strip()) for w in words.tokenize(s)],
                    "nltk Treebank words in sentences split at .!?")

    def __call__(self, hypothesis: str, reference: str) -> float:
        from nltk.translate.meteor_score import meteor_score

        wordnet = self.source.reader if self.source else _NoSynonyms()
        hyp, ref = self._tokenize(hypothesis), self._tokenize(reference)
        if not hyp or not ref:
            return 0.0
        return float(meteor_score([ref], hyp, wordnet=wordnet))

    def settings(self) -> dict:
        return {"synonyms": self.synonyms, "wordnet": self.note, "tokenizer": self.tokenizer,
                "alpha": 0.9, "beta": 3.0, "gamma": 0.5}


def sentence_scores(hypothesis: str, reference: str, meteor: Meteor) -> dict[str, float]:
    """BLEU-1, ROUGE-1, ROUGE-L and METEOR of one generated text against its reference."""
    return {"bleu1": bleu1(hypothesis, reference), **rouge(hypothesis, reference),
            "meteor": meteor(hypothesis, reference)}


def bertscore_layers(model_path: str | Path) -> int:
    """The layer bert-score uses for a model folder named like a known model (roberta-large: 17,
    the paper's scorer), else the folder model's last layer."""
    import json

    from bert_score.utils import model2layers

    folder = Path(model_path)
    if folder.name in model2layers:
        return model2layers[folder.name]
    return int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])


def bert_score(hypotheses: Sequence[str], references: Sequence[str], model_path: str | Path, *,
               num_layers: int | None = None, device: str = "cpu", batch_size: int = 16) -> list[float]:
    """BERTScore F1 per pair from a local encoder folder (nothing is downloaded). The Med3DVLM
    scripts use bert-score's English default, roberta-large at layer 17."""
    folder = Path(model_path)
    if not (folder / "config.json").is_file():
        raise ModelError(f"BERTScore needs a local encoder folder with config.json (got {model_path}); nothing "
                         "is downloaded, so save a model such as roberta-large with save_pretrained and pass it.")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references.")
    if not hypotheses:
        return []
    from bert_score import score

    try:
        _, _, f1 = score(list(hypotheses), list(references), model_type=str(folder),
                         num_layers=num_layers or bertscore_layers(folder), batch_size=batch_size, device=device,
                         idf=False, rescale_with_baseline=False)
    except (OSError, ValueError) as error:
        raise ModelError(f"Cannot score with the BERTScore model in {folder}: {error}") from error
    return [float(x) for x in f1]
