"""Guessing modality (CT/MR) and MRI sequence from DICOM tags, descriptions and file names."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .volume import Volume

_SEQUENCE_WORDS = (  # first match wins: "T2 FLAIR" is FLAIR, "DWI ADC" is ADC
    ("ADC", {"adc", "apparent"}),
    ("DWI", {"dwi", "diffusion", "diff", "trace", "dti", "b1000"}),
    ("FLAIR", {"flair", "t2f", "tirm", "darkfluid"}),
    ("T1C", {"t1c", "t1ce", "t1gd", "t1post", "t1contrast"}),
    ("T1", {"t1", "t1w", "t1n", "t1wi", "mprage", "spgr", "bravo"}),
    ("T2", {"t2", "t2w", "t2wi", "haste"}),
)
_CONTRAST_WORDS = {"post", "gd", "gad", "gado", "gadolinium", "contrast", "ce", "c"}  # "c" from "T1+C"
_PLAIN_WORDS = {"pre", "precontrast", "native", "noncontrast"}
_CT_WORDS = {"ct", "cta", "hrct", "ncct", "cect"}
_MR_WORDS = {"mr", "mri"}
_TEXT_TAGS = ("SeriesDescription", "ProtocolName", "SequenceName", "description")


def _words(text: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", text.lower())) - {""}


def _sequence_from_words(words: set[str]) -> str | None:
    for sequence, keys in _SEQUENCE_WORDS:
        if words & keys:
            if sequence == "T1" and words & _CONTRAST_WORDS and not words & _PLAIN_WORDS:
                return "T1C"
            return sequence
    return None


def _sequence_from_timing(meta: Mapping[str, Any]) -> str | None:
    """MR physics when names say nothing: diffusion b-value, else TR/TE/TI weighting."""

    def number(tag: str) -> float | None:
        try:
            return float(meta[tag])
        except (KeyError, TypeError, ValueError):
            return None

    if (number("DiffusionBValue") or 0) > 0:
        return "DWI"
    tr, te, ti = number("RepetitionTime"), number("EchoTime"), number("InversionTime")
    if tr is None or te is None:
        return None
    if te >= 70 and ((ti or 0) >= 1500 or ("IR" in str(meta.get("ScanningSequence", "")) and tr >= 6000)):
        return "FLAIR"
    if te >= 70 and tr >= 2000:
        return "T2"
    return "T1" if te <= 30 and tr <= 1000 else None


def guess_modality(
    volume_or_metadata: Volume | Mapping[str, Any] | None, filename: str | Path | None = None
) -> tuple[str, str | None]:
    """(modality, sequence) from DICOM tags, descriptions and the file name; ("unknown", None) if unsure."""
    if isinstance(volume_or_metadata, Volume):
        meta, filename = volume_or_metadata.metadata, filename or volume_or_metadata.source
    else:
        meta = volume_or_metadata or {}
    texts = [" ".join(str(meta.get(tag, "")) for tag in _TEXT_TAGS), Path(filename).name if filename else ""]
    words = [_words(text) for text in texts]
    sequence = next(filter(None, map(_sequence_from_words, words)), None) or _sequence_from_timing(meta)
    if sequence == "T1" and str(meta.get("ContrastBolusAgent", "")).strip():
        sequence = "T1C"
    tag, every_word = str(meta.get("Modality", "")).upper(), set().union(*words)
    if tag:
        modality = tag if tag in ("CT", "MR") else "unknown"
    elif every_word & _CT_WORDS:
        modality = "CT"
    else:
        modality = "MR" if sequence or every_word & _MR_WORDS else "unknown"
    return modality, sequence if modality == "MR" else None
