"""MRI abnormality detection with a MedMAP model: study in, per-label probabilities out.

A study is one volume, a list of volumes, or a ``{sequence: volume}`` mapping (the user's choice
of sequence). Sequences of volumes come from ``Volume.sequence``, else ``modality.guess_modality``
(DICOM tags, descriptions, file names). Each volume is preprocessed on its own (MR percentile
scaling per sequence), encoded, and the sequences are fused by the model's attention weights.

Saved layout (one folder): ``config.json`` (``model_type: "medmap-detector"``, the model config,
thresholds, preprocessing), ``model.safetensors`` and the tokenizer files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .attribution import Progress, frozen
from .cancel import CancelToken
from .checkpoints import WEIGHTS_NAME, load_weights, read_config, save_weights, write_config
from .data.medmom_samples import StudySample, collate_studies
from .detection_result import DetectionResult, LabelScore
from .errors import ModelError, VolumeError
from .evidence import Evidence, evidence_maps
from .modality import guess_modality
from .model_input import prepare_input
from .models.medmap import MedMAPConfig, MedMAPModel
from .preprocess import PreprocessConfig
from .region import Region
from .tokenizer import load_tokenizer
from .volume import Volume

MODEL_TYPE = "medmap-detector"
STUDY_KEY = "study"  # thresholds for several sequences; single-sequence thresholds use the sequence name

StudyLike = Volume | Mapping[str, Volume] | Sequence[Volume]


def detector_preprocess(input_size: Sequence[int]) -> PreprocessConfig:
    """The preprocessing a detector of this input size trains and runs with."""
    return PreprocessConfig(shape=tuple(int(s) for s in input_size))


def as_study(volume_or_study: StudyLike, sequences: Sequence[str]) -> dict[str, Volume]:
    """{sequence: volume} from any accepted input; ``sequences`` are the ones the model knows."""
    if isinstance(volume_or_study, Volume):
        items = [(None, volume_or_study)]
    elif isinstance(volume_or_study, Mapping):
        items = list(volume_or_study.items())
    elif isinstance(volume_or_study, Sequence) and all(isinstance(v, Volume) for v in volume_or_study):
        items = [(None, v) for v in volume_or_study]
    else:
        raise VolumeError(f"Abnormality detection takes a Volume, a list of Volumes or a {{sequence: Volume}} "
                          f"mapping, not {type(volume_or_study).__name__}.")
    if not items:
        raise VolumeError("Abnormality detection needs at least one MRI volume; the study is empty.")
    known = {s.upper(): s for s in sequences}
    study: dict[str, Volume] = {}
    for chosen, volume in items:
        if not isinstance(volume, Volume):
            raise VolumeError(f"The study entry {chosen!r} is a {type(volume).__name__}, not a Volume.")
        modality, guessed = guess_modality(volume)
        if volume.modality == "CT" or (chosen is None and modality == "CT"):
            raise VolumeError(f"{volume.name} is a CT volume; MedMAP abnormality detection needs MRI.")
        sequence = chosen or volume.sequence or guessed
        if sequence is None:
            raise VolumeError(f"The MRI sequence of {volume.name} is unknown (no header or file name says it); "
                              f"pass the study as {{sequence: volume}} with one of {tuple(sequences)}.")
        if str(sequence).upper() not in known:
            raise VolumeError(f"{volume.name} is a {sequence} volume, but this detector knows only the "
                              f"sequences {tuple(sequences)}.")
        sequence = known[str(sequence).upper()]
        if sequence in study:
            raise VolumeError(f"The study has two {sequence} volumes ({study[sequence].name} and {volume.name}); "
                              "pass one volume per sequence.")
        study[sequence] = volume
    return study


def subsets_of(sequences: Sequence[str]) -> dict[str, tuple[str, ...] | None]:
    """The full study (each study's own sequences) and every sequence alone."""
    return {STUDY_KEY: None, **{s: (s,) for s in sequences}}


@torch.inference_mode()
def score_studies(model: MedMAPModel, samples: Sequence[StudySample], sequences: Sequence[str] | None = None,
                  zero_shot: bool = False, batch_size: int = 8) -> np.ndarray:
    """(n, L) probabilities from the given sequences of every study (all of its own when None)."""
    model.eval()
    device = model.bias.device
    rows = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = collate_studies([(torch.stack([s.pixels[n].float() for n in sequences or s.pixels]),
                                  model.sequence_ids(list(sequences or s.pixels)).cpu(), s.labels, None) for s in chunk])
        logits = model(batch["images"].to(device), batch["sequence_ids"].to(device), batch["mask"].to(device),
                       zero_shot)["logits"]
        rows.append(logits.sigmoid().float().cpu().numpy())
    return np.concatenate(rows)


class Detector:
    """A MedMAP model + tokenizer + per-label thresholds + preprocessing, ready for ``detect``."""

    def __init__(self, model: MedMAPModel, tokenizer, thresholds: Mapping[str, Sequence[float | None]],
                 preprocess_config: PreprocessConfig) -> None:
        n = len(model.config.labels)
        if STUDY_KEY not in thresholds or any(len(t) != n for t in thresholds.values()):
            raise ModelError(f"Detector thresholds need a '{STUDY_KEY}' entry and {n} values per entry.")
        self.model, self.tokenizer = model.eval(), tokenizer
        # None: a label this detector does not call on those sequences (validation showed no usable cut)
        self.thresholds = {key: [None if v is None else float(v) for v in values] for key, values in thresholds.items()}
        self.preprocess_config = preprocess_config

    @property
    def labels(self) -> tuple[tuple[str, str], ...]:
        return self.model.config.labels

    @property
    def sequences(self) -> tuple[str, ...]:
        return self.model.config.sequences

    @property
    def device(self) -> torch.device:
        return self.model.bias.device

    def to(self, device: str | torch.device) -> Detector:
        self.model.to(device)
        return self

    @torch.inference_mode()
    def detect(self, volume_or_study: StudyLike, region: Region | None = None) -> DetectionResult:
        """Per-label probabilities for one MRI study (a volume, a list, or {sequence: volume}),
        each volume cropped to ``region`` (RAS mm corners) if given."""
        study = as_study(volume_or_study, self.sequences)
        names = list(study)
        images = torch.stack([prepare_input(study[n], self.preprocess_config, region)[0] for n in names]).to(self.device)
        ids = self.model.sequence_ids(names)
        output = self.model(images[None], ids[None], torch.ones(1, len(names), dtype=torch.bool, device=self.device))
        probabilities = output["logits"].sigmoid()[0].float().cpu().tolist()
        weights = output["weights"][0].float().cpu().tolist()
        cuts = self.thresholds.get(names[0] if len(names) == 1 else STUDY_KEY, self.thresholds[STUDY_KEY])
        scores = [LabelScore(organ, kind, p, t) for (organ, kind), p, t in zip(self.labels, probabilities, cuts)]
        scores.sort(key=lambda s: -s.probability)
        return DetectionResult(scores, tuple(names), dict(zip(names, weights)),
                               {n: study[n].name for n in names})

    def label_index(self, label: str | tuple[str, str]) -> int:
        """The index of a label given as (organ, kind) or as its text ("cyst in the liver")."""
        names = [LabelScore(organ, kind, 0.0, 0.0).label.lower() for organ, kind in self.labels]
        key = (label if isinstance(label, str) else LabelScore(*label, 0.0, 0.0).label).strip().lower()
        if key not in names:
            raise ModelError(f"This detector has no label {label!r}; it scores {', '.join(names)}.")
        return names.index(key)

    def explain(self, volume_or_study: StudyLike, label: str | tuple[str, str], region: Region | None = None, *,
                method: str = "smoothgrad", samples: int = 8, cancel: CancelToken | None = None,
                progress: Progress | None = None) -> dict[str, Evidence]:
        """Evidence for one label's score: a map on each volume's grid, by sequence. The score is
        the label's logit; the answer is its probability. ``cancel``, ``progress``: see
        ``attribution.attribute``."""
        study = as_study(volume_or_study, self.sequences)
        index, names = self.label_index(label), list(study)
        inputs = [prepare_input(study[n], self.preprocess_config, region, device=self.device) for n in names]
        images = torch.stack([image for image, _ in inputs])
        ids = self.model.sequence_ids(names)[None]
        mask = torch.ones_like(ids, dtype=torch.bool)

        def logit(x: torch.Tensor) -> torch.Tensor:
            return self.model(x[None], ids, mask)["logits"][0, index]

        with frozen(self.model):
            maps = evidence_maps(logit, images, [study[n] for n in names], [r for _, r in inputs], method, samples,
                                 cancel=cancel, progress=progress)
            with torch.no_grad():
                probability = float(torch.sigmoid(logit(images)))
        question = LabelScore(*self.labels[index], probability, 0.0).label
        return {n: Evidence(m, f"{probability:.3f}", question, method, record)
                for n, m, (_, record) in zip(names, maps, inputs)}

    # ---- persistence ---------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        pre = asdict(self.preprocess_config)
        pre.pop("dtype")
        write_config(folder, {"model_type": MODEL_TYPE, "model": self.model.config.to_dict(),
                              "thresholds": self.thresholds, "preprocess": pre})
        save_weights(self.model, folder / WEIGHTS_NAME)
        self.tokenizer.save_pretrained(str(folder))

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device | None = None) -> Detector:
        config = read_config(folder)
        if config.get("model_type") != MODEL_TYPE:
            raise ModelError(f"The config.json in {folder} describes {config.get('model_type')!r}, not a "
                             f"{MODEL_TYPE}.")
        try:
            model_config = MedMAPConfig.from_dict(config["model"])
            preprocess_config = PreprocessConfig(**config["preprocess"])
            thresholds = config["thresholds"]
        except (KeyError, TypeError, ValueError) as error:
            raise ModelError(f"The config.json in {folder} lacks or misnames a field ({error}).") from error
        # Built for real: the text tower holds non-persistent buffers (position ids) not in the file.
        model = MedMAPModel(model_config)
        load_weights(model, Path(folder) / WEIGHTS_NAME)
        tokenizer = load_tokenizer(folder)
        model.use_tokenizer(tokenizer)
        model.freeze_text(True)
        return cls(model.to(device or "cpu"), tokenizer, thresholds, preprocess_config)
