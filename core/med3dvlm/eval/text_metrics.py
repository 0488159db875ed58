"""Text metrics for generated reports and open VQA answers: BLEU-1..4, ROUGE-L, METEOR, BERTScore.

Pure Python/NumPy, nothing downloaded. Texts are compared after :func:`tokenize` (lower case,
punctuation dropped). Each reference argument is one string per hypothesis, or a list of
strings when a hypothesis has several references.

METEOR here matches exact words, then words with the same stem (a small suffix stripper), with
the usual parameters (alpha 0.9, beta 3, gamma 0.5, as in NLTK and HF ``evaluate``). WordNet
synonyms are not available offline, so the synonym stage is missing: scores are a lower bound of
the official METEOR, up to small differences in stemming and alignment search.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ModelError

References = str | Sequence[str]
_WORD = re.compile(r"\w+(?:[.'\-]\w+)*")
_SMOOTHING = ("none", "epsilon", "add-one")


def tokenize(text: str) -> list[str]:
    """Lower-case words; numbers like 3.5 and words like non-contrast stay whole."""
    return _WORD.findall(text.lower())


def _ref_list(references: References) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("Every hypothesis needs at least one reference.")
    return refs


def _pairs(hypotheses: Sequence[str], references: Sequence[References]) -> list[tuple[str, list[str]]]:
    if isinstance(hypotheses, str):
        raise TypeError("Pass a list of hypotheses; use the sentence_* function for a single one.")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references.")
    if not hypotheses:
        raise ValueError("No hypotheses to score.")
    return [(hyp, _ref_list(refs)) for hyp, refs in zip(hypotheses, references)]


# ---------------------------------------------------------------- BLEU


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _bleu_stats(hyp: list[str], refs: list[list[str]], max_n: int) -> np.ndarray:
    """[matches_1..n, totals_1..n, hyp_len, ref_len]; the reference length closest to the hypothesis."""
    stats = np.zeros(2 * max_n + 2)
    for n in range(1, max_n + 1):
        counts = _ngrams(hyp, n)
        best: Counter = Counter()
        for ref in refs:
            best |= _ngrams(ref, n)  # clip by the largest count in any one reference
        stats[n - 1] = sum(min(c, best[g]) for g, c in counts.items())
        stats[max_n + n - 1] = max(0, len(hyp) - n + 1)
    stats[-2] = len(hyp)
    stats[-1] = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    return stats


def _bleu_from_stats(stats: np.ndarray, max_n: int, smoothing: str) -> list[float]:
    if smoothing not in _SMOOTHING:
        raise ValueError(f"smoothing must be one of {_SMOOTHING}, not {smoothing!r}.")
    hyp_len, ref_len = stats[-2], stats[-1]
    if hyp_len == 0:
        return [0.0] * max_n
    log_p = []
    for n in range(1, max_n + 1):
        matches, total = stats[n - 1], stats[max_n + n - 1]
        if smoothing == "add-one" and n > 1:  # Lin & Och (2004)
            matches, total = matches + 1, total + 1
        elif smoothing == "epsilon" and matches == 0:  # Chen & Cherry (2014), method 1
            matches, total = 0.1, max(total, 1)
        log_p.append(math.log(matches / total) if matches > 0 else -math.inf)
    brevity = 0.0 if hyp_len >= ref_len else 1 - ref_len / hyp_len
    return [math.exp(brevity + sum(log_p[:n]) / n) for n in range(1, max_n + 1)]  # exp(-inf) = 0


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[References], max_n: int = 4,
                smoothing: str = "none") -> list[float]:
    """Cumulative BLEU-1..max_n with n-gram counts and lengths pooled over the corpus (Papineni)."""
    pairs = _pairs(hypotheses, references)
    stats = sum(_bleu_stats(tokenize(h), [tokenize(r) for r in refs], max_n) for h, refs in pairs)
    return _bleu_from_stats(stats, max_n, smoothing)


def sentence_bleu(hypothesis: str, references: References, max_n: int = 4, smoothing: str = "epsilon") -> list[float]:
    """BLEU-1..max_n of one sentence; smoothed by default since short texts often lack 4-grams."""
    stats = _bleu_stats(tokenize(hypothesis), [tokenize(r) for r in _ref_list(references)], max_n)
    return _bleu_from_stats(stats, max_n, smoothing)


# ---------------------------------------------------------------- ROUGE-L


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def sentence_rouge_l(hypothesis: str, references: References, beta: float = 1.0) -> float:
    """LCS F-measure (Lin 2004), best over the references; beta=1 is ROUGE-L F1."""
    hyp, best = tokenize(hypothesis), 0.0
    for ref in map(tokenize, _ref_list(references)):
        lcs = _lcs_length(hyp, ref)
        if lcs:
            p, r = lcs / len(hyp), lcs / len(ref)
            best = max(best, (1 + beta**2) * p * r / (r + beta**2 * p))
    return best


def rouge_l(hypotheses: Sequence[str], references: Sequence[References], beta: float = 1.0) -> float:
    """Mean sentence ROUGE-L over the corpus."""
    return float(np.mean([sentence_rouge_l(h, refs, beta) for h, refs in _pairs(hypotheses, references)]))


# ---------------------------------------------------------------- METEOR

# (suffix, replacement), longest first; a stem keeps at least three letters.
_SUFFIXES = [("ational", "ate"), ("ization", "ize"), ("fulness", "ful"), ("ousness", "ous"), ("iveness", "ive"),
             ("ements", ""), ("ement", ""), ("ments", ""), ("ment", ""), ("ations", "ate"), ("ation", "ate"),
             ("ities", ""), ("ity", ""), ("ings", ""), ("ing", ""), ("edly", ""), ("ed", ""), ("ies", "y"),
             ("es", ""), ("ly", ""), ("s", ""), ("e", "")]


def simple_stem(word: str) -> str:
    """Strip one common English suffix: lesions/lesion, enlarged/enlargement/enlarge, opacities/opacity."""
    for suffix, replacement in _SUFFIXES:
        if not word.endswith(suffix) or len(word) - len(suffix) < 3:
            continue
        if suffix == "s" and word.endswith(("ss", "us", "is")):
            continue
        if suffix == "es" and not word.endswith(("sses", "shes", "ches", "xes", "zes")):
            continue  # "lesions" is lesion+s, "masses" is mass+es
        stem = word[: len(word) - len(suffix)] + replacement
        if suffix in ("ed", "ing", "ings", "edly") and len(stem) > 3 and stem[-1] == stem[-2] and stem[-1] not in "lsz":
            stem = stem[:-1]  # stopped -> stop
        return stem
    return word


def _align(hyp: list[str], ref: list[str], stemming: bool) -> list[tuple[int, int]]:
    """Word matches (hyp index, ref index): exact stage, then stem stage on what is left.

    Each hypothesis word takes, in order of preference, the reference word right after the
    previous match, the first free one after it, or the first free one, to keep chunks few.
    """
    matched_h: dict[int, int] = {}
    used_r: set[int] = set()
    keys = [lambda w: w] + ([simple_stem] if stemming else [])
    for key in keys:
        ref_keys = [key(w) for w in ref]
        last = -1
        for i, word in enumerate(hyp):
            if i in matched_h:
                last = matched_h[i]
                continue
            free = [j for j, k in enumerate(ref_keys) if j not in used_r and k == key(word)]
            if not free:
                continue
            j = last + 1 if last + 1 in free else next((j for j in free if j > last), free[0])
            matched_h[i], last = j, j
            used_r.add(j)
    return sorted(matched_h.items())


def sentence_meteor(hypothesis: str, references: References, *, alpha: float = 0.9, beta: float = 3.0,
                    gamma: float = 0.5, stemming: bool = True) -> float:
    """METEOR of one sentence (exact + stem matches, no synonyms), best over the references."""
    hyp, best = tokenize(hypothesis), 0.0
    for ref in map(tokenize, _ref_list(references)):
        pairs = _align(hyp, ref, stemming)
        if not pairs:
            continue
        m = len(pairs)
        p, r = m / len(hyp), m / len(ref)
        fmean = p * r / (alpha * p + (1 - alpha) * r)
        chunks = 1 + sum(1 for (h0, r0), (h1, r1) in zip(pairs, pairs[1:]) if h1 != h0 + 1 or r1 != r0 + 1)
        best = max(best, fmean * (1 - gamma * (chunks / m) ** beta))
    return best


def meteor(hypotheses: Sequence[str], references: Sequence[References], **kwargs) -> float:
    """Mean sentence METEOR over the corpus (as NLTK / HF ``evaluate`` report it)."""
    return float(np.mean([sentence_meteor(h, refs, **kwargs) for h, refs in _pairs(hypotheses, references)]))


def text_metrics(hypotheses: Sequence[str], references: Sequence[References]) -> dict[str, float]:
    """Corpus BLEU-1..4, mean ROUGE-L F1 and mean METEOR in one dictionary."""
    scores = {f"bleu{n}": value for n, value in enumerate(corpus_bleu(hypotheses, references), start=1)}
    scores["rouge_l"] = rouge_l(hypotheses, references)
    scores["meteor"] = meteor(hypotheses, references)
    return scores


# ---------------------------------------------------------------- BERTScore


def bert_score(hypotheses: Sequence[str], references: Sequence[References], model_path: str | Path | None, *,
               layer: int = -1, device: str = "cpu", batch_size: int = 16) -> dict[str, list[float]]:
    """BERTScore P/R/F1 (greedy cosine matching of token embeddings; no IDF, no rescaling).

    Needs a local Hugging Face encoder folder (e.g. roberta-large saved with save_pretrained);
    pick ``layer`` as the BERTScore authors did for that model. Best F1 over the references.
    """
    folder = Path(model_path) if model_path else None
    if folder is None or not (folder / "config.json").is_file():
        raise ModelError(
            f"BERTScore needs a local encoder folder with config.json (got {model_path!r}); nothing is downloaded "
            "offline, so save a model such as roberta-large with save_pretrained and pass its folder."
        )
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True).to(device).eval()
    except (OSError, ValueError) as error:
        raise ModelError(f"Cannot load the BERTScore model from {folder}: {error}") from error

    def embed(texts: list[str]) -> list[torch.Tensor]:
        out = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                            return_tensors="pt", return_special_tokens_mask=True)
            keep = enc.pop("special_tokens_mask").eq(0) & enc["attention_mask"].bool()
            with torch.no_grad():
                hidden = model(**enc.to(device), output_hidden_states=True).hidden_states[layer]
            hidden = torch.nn.functional.normalize(hidden.float(), dim=-1).cpu()
            out.extend(h[k] for h, k in zip(hidden, keep))
        return out

    def match(h: torch.Tensor, r: torch.Tensor) -> tuple[float, float, float]:
        if len(h) == 0 or len(r) == 0:
            return 0.0, 0.0, 0.0
        sim = h @ r.T
        p, rc = sim.max(dim=1).values.mean().item(), sim.max(dim=0).values.mean().item()
        return p, rc, (2 * p * rc / (p + rc) if p + rc > 0 else 0.0)

    pairs = _pairs(hypotheses, references)
    hyp_emb = embed([h for h, _ in pairs])
    ref_emb = iter(embed([r for _, refs in pairs for r in refs]))
    result: dict[str, list[float]] = {"precision": [], "recall": [], "f1": []}
    for h, (_, refs) in zip(hyp_emb, pairs):
        best = max((match(h, next(ref_emb)) for _ in refs), key=lambda scores: scores[2])
        for name, value in zip(result, best):
            result[name].append(value)
    return result
