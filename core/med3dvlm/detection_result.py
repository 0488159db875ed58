"""The result of MRI abnormality detection: plain data, no torch, so that clients of a model
server (the Slicer module) read it without loading the model stack."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

NOT_CALLED = "not called on these sequences"  # how every front end names a label without a threshold


@dataclass(frozen=True)
class LabelScore:
    organ: str
    kind: str
    probability: float
    threshold: float | None    # None: validation showed no cut that tells this label on these sequences

    @property
    def called(self) -> bool:
        """Whether the detector calls this label at all on the sequences it was given."""
        return self.threshold is not None

    @property
    def positive(self) -> bool:
        return self.called and self.probability >= self.threshold

    @property
    def label(self) -> str:
        return f"{self.kind} in the {self.organ}"


@dataclass
class DetectionResult:
    """Scores sorted by probability (highest first), the sequences used and their fusion weights."""

    scores: list[LabelScore]
    sequences: tuple[str, ...]
    sequence_weights: dict[str, float]          # mean fusion weight of each sequence (sums to 1)
    sources: dict[str, str] = field(default_factory=dict)  # sequence -> volume name
    modality: str = "MR"

    @property
    def findings(self) -> list[LabelScore]:
        """The labels at or above their threshold."""
        return [s for s in self.scores if s.positive]

    def probability(self, organ: str, kind: str) -> float:
        for score in self.scores:
            if (score.organ, score.kind) == (organ, kind):
                return score.probability
        raise KeyError(f"No label ({organ!r}, {kind!r}) in this result.")

    def rows(self) -> list[dict[str, Any]]:
        """One row per label for a table view: organ, kind, probability, threshold (None: not called), positive."""
        return [{**asdict(s), "positive": s.positive} for s in self.scores]

    # Mapping view {label: probability}, highest first: what the Slicer logic stores and shows.
    def keys(self) -> list[str]:
        return [s.label for s in self.scores]

    def __getitem__(self, label: str) -> float:
        for score in self.scores:
            if score.label == label:
                return score.probability
        raise KeyError(label)

    def to_dict(self) -> dict[str, Any]:
        return {"modality": self.modality, "sequences": list(self.sequences), "sources": self.sources,
                "sequence_weights": self.sequence_weights, "scores": self.rows()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectionResult:
        """The inverse of :meth:`to_dict` (a model server's answer)."""
        scores = [LabelScore(r["organ"], r["kind"], float(r["probability"]),
                             None if r["threshold"] is None else float(r["threshold"]))
                  for r in data["scores"]]
        return cls(scores, tuple(data["sequences"]), {k: float(v) for k, v in data["sequence_weights"].items()},
                   dict(data.get("sources", {})), data.get("modality", "MR"))
