"""The pipeline: load a model once, encode each volume once, then report, ask and retrieve.

    >>> import med3dvlm
    >>> pipe = med3dvlm.load("demo")
    >>> print(pipe.report("resources/samples/ct_phantom.nii.gz"))
    >>> pipe.ask(volume, "Which organ has the cyst?", choices=["liver", "spleen", "left kidney", "lungs"])

Front ends (CLI, Slicer) call these methods from a worker thread; ``on_token`` is called from
that thread for each text piece and a ``CancelToken`` stops generation within one step.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict

import numpy as np
import torch

from . import prompts
from .answerer import TokenCallback
from .attribution import Progress
from .cancel import Cancelled, CancelToken
from .detection import DetectionResult, Detector
from .loading import DETECTOR_FOLDER, load_model
from .official import stop_token_ids
from .quantization import quantization_of
from .errors import Med3DVLMError, Med3DVLMWarning, ModelError
from .generation import ANSWER_SETTINGS, REPORT_SETTINGS, CallbackStreamer, GenerationSettings, stopping_criteria
from .evidence import explain_answer
from .explained import Evidence, ModelView
from .model_input import framing_key, input_record, prepare_input
from .model_view import model_view
from .preprocess import PRESETS, PreprocessConfig
from .provenance import record
from .readers import as_volume
from .region import Region
from .volume import Volume
from .volume_cache import Recent, known_volumes


VolumeLike = Volume | str | os.PathLike | tuple[np.ndarray, np.ndarray]
Window = tuple[float, float]  # (centre, width) of a CT window, in place of the preset's
GENERATION_DEFAULTS = {"report": REPORT_SETTINGS, "ask": ANSWER_SETTINGS}
DETECTOR_TASKS = ("detect", "explain-score")  # tasks whose volumes the detector's preprocessing prepares


class ContextWarning(Med3DVLMWarning):
    """Earlier chat turns were dropped so that the prompt fits the model's context."""


def load(model: str | os.PathLike = "demo", device: str = "auto", dtype: str | torch.dtype = "auto",
         quantization: str | None = None, cache_size: int = 8, allow_pickle: bool = False) -> "Pipeline":
    """Load a model folder (or the bundled ``"demo"`` model) into a ready-to-use pipeline; the other
    arguments are those of :func:`med3dvlm.loading.load_model`."""
    with _friendly_oom("loading the model"):
        loaded = load_model(model, device, dtype, quantization=quantization, allow_pickle=allow_pickle)
    return Pipeline(loaded.model, loaded.tokenizer, retrieval=loaded.retrieval, detector=loaded.detector,
                    name=loaded.name, cache_size=cache_size, weights=loaded.weights)


class _friendly_oom:
    """Turns CUDA out-of-memory into an actionable message."""

    def __init__(self, doing: str) -> None:
        self.doing = doing

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
            raise ModelError(f"The GPU ran out of memory while {self.doing}; try dtype='float16', "
                             "quantization='4bit', or device='cpu'.") from exc
        return False


def _question(question: str | None) -> str:
    question = (question or "").strip()
    if not question:
        raise Med3DVLMError("The question is empty; type a question about the volume.")
    return question


def _members(volume) -> list[tuple[str | None, object]]:
    """(sequence, volume) of each volume of a volume, a list or a {sequence: volume} study."""
    if volume is None:
        return []
    if isinstance(volume, dict):
        return list(volume.items())
    return [(None, v) for v in volume] if isinstance(volume, list) else [(None, volume)]


class Pipeline:
    def __init__(self, model, tokenizer, *, retrieval=None, detector: Detector | None = None, name: str = "model",
                 cache_size: int = 8, weights: str | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.retrieval = retrieval.eval() if retrieval is not None else None
        self.detector = detector
        self.model_name = name
        self.weights = weights  # BLAKE2b of the weight files (provenance)
        self.preprocess_config: PreprocessConfig = PRESETS[model.config.preprocess_preset]
        self.num_image_tokens: int = model.config.num_image_tokens
        self.stop_token_ids: list[int] = stop_token_ids(model, tokenizer)  # all the release lists, not only EOS
        self._tokens = Recent(cache_size)  # (digest, framing) -> (image tokens, preprocessing applied)
        self._lock = threading.Lock()  # one generation at a time on one model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def quantization(self) -> str | None:
        """'4bit' / '8bit' when the language model's decoder is quantized, else None."""
        return quantization_of(self.model)

    def describe(self) -> dict:
        return {"name": self.model_name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "quantization": self.quantization, "capabilities": ["report", "ask", "explain", "view"]
                + ["retrieve"] * (self.retrieval is not None) + ["detect"] * (self.detector is not None)}

    # ----- volumes and image tokens -------------------------------------------------------------
    as_volume = staticmethod(as_volume)

    def pixels(self, volume: VolumeLike, region: Region | None = None, window: Window | None = None) -> torch.Tensor:
        """The model input (1, 1, D, H, W) for a volume (cropped to ``region``, in ``window``)."""
        return self._prepared(volume, region, window)[0]

    def _prepared(self, volume: VolumeLike, region: Region | None = None,
                  window: Window | None = None) -> tuple[torch.Tensor, dict]:
        """The model input and the preprocessing applied to make it (provenance)."""
        image, done = prepare_input(self.as_volume(volume), self.preprocess_config, region, window, self.device)
        return image[None].to(self.dtype), done

    def encode(self, volume: VolumeLike, region: Region | None = None, window: Window | None = None) -> torch.Tensor:
        """Image tokens (1, N, hidden) of a volume; computed once per volume content, region and
        window, and cached."""
        return self._encoded(volume, region, window)[0]

    def _encoded(self, volume: VolumeLike, region: Region | None = None,
                 window: Window | None = None) -> tuple[torch.Tensor, dict]:
        """Tokens and preprocessing by the volume's digest (a file or frozen Volume asked about again
        is not even read and hashed again: see volume_cache) and the framing."""
        digest, loaded = known_volumes.digest(volume, self.as_volume)
        key = digest + framing_key(region, window)
        cached = self._tokens.get(key)
        if cached is None:
            loaded = loaded if loaded is not None else self.as_volume(volume)
            with _friendly_oom("encoding the volume"), torch.inference_mode():
                pixels, done = self._prepared(loaded, region, window)
                cached = self.model.encode_images(pixels), done
            self._tokens.put(key, cached)
        return cached

    # ----- provenance ----------------------------------------------------------------------------
    def provenance(self, task: str, volume=None, *, region: Region | None = None, window: Window | None = None,
                   **settings) -> dict:
        """How ``task`` ("report", "ask", "detect", "retrieve", "explain", "explain-score", "view",
        "evaluate") is done for ``volume`` (for the detector's tasks also a list or {sequence: volume}
        study) with these generation ``settings`` (as passed to report/ask): model, weights digest,
        package, device, precision,
        quantization, the preprocessing applied to each volume, generation settings, seed (see
        provenance.record). Plain JSON; callers add ``seconds``. Report and ask return text, so
        this is how their callers learn what produced it; a volume they encoded is not read,
        preprocessed or encoded again here. ``region`` and ``window`` as given to the task."""
        detector = task in DETECTOR_TASKS and self.detector is not None
        config = self.detector.preprocess_config if detector else self.preprocess_config
        preprocessing = {"preset": {k: v for k, v in asdict(config).items() if k != "dtype"},
                         "volumes": [self._applied(task, v, config, sequence, region, window)
                             for sequence, v in _members(volume)]}
        defaults = GENERATION_DEFAULTS.get(task)
        return record(self, task, preprocessing=preprocessing,
                      generation=asdict(defaults.updated(**settings)) if defaults else None)

    def _applied(self, task: str, volume, config: PreprocessConfig, sequence: str | None, region: Region | None,
                 window: Window | None) -> dict:
        if task in GENERATION_DEFAULTS:  # encoded for the answer: remembered with its image tokens
            return self._encoded(volume, region, window)[1]
        loaded = self.as_volume(volume)
        return {**({"sequence": sequence or loaded.sequence} if task in DETECTOR_TASKS else {}),
                **input_record(loaded, config, region, window)}

    # ----- generation ----------------------------------------------------------------------------
    def report(self, volume: VolumeLike, *, instruction: str = prompts.REPORT_PROMPT,
               on_token: TokenCallback | None = None, cancel: CancelToken | None = None,
               region: Region | None = None, window: Window | None = None, **settings) -> str:
        """A radiology report of the volume (or of ``region``: two opposite corners in RAS mm, see
        ``med3dvlm.region``; ``window``: (centre, width) instead of the preset's), streamed to
        ``on_token`` if given."""
        prompt = prompts.report_prompt(self.num_image_tokens, instruction)
        return self._generate(self.encode(volume, region, window), prompt, REPORT_SETTINGS.updated(**settings),
                              on_token, cancel)

    def ask(self, volume: VolumeLike, question: str, *, history: Sequence[tuple[str, str]] = (),
            choices: Sequence[str] | None = None, on_token: TokenCallback | None = None,
            cancel: CancelToken | None = None, region: Region | None = None, window: Window | None = None,
            **settings) -> str:
        """Answer a question about the volume (or ``region``, in ``window``: see ``report``), given
        earlier ``(question, answer)`` turns.

        With ``choices`` (a closed question) the answer is the most likely choice, as ``"B. spleen"``.
        """
        question = _question(question)
        image_tokens = self.encode(volume, region, window)
        settings = ANSWER_SETTINGS.updated(**settings)
        history = self._fit_history(question, list(history), choices, settings.max_new_tokens)
        prompt = prompts.vqa_prompt(self.num_image_tokens, question, history, choices)
        if choices:
            answer = self._best_choice(image_tokens, prompt, choices)
            if on_token is not None:
                on_token(answer)
            return answer
        return self._generate(image_tokens, prompt, settings, on_token, cancel)

    def stream_report(self, volume: VolumeLike, **kwargs) -> Iterator[str]:
        """Iterator form of :meth:`report`: yields text pieces as they are generated."""
        return self._iterate(self.report, volume, **kwargs)

    def stream_ask(self, volume: VolumeLike, question: str, **kwargs) -> Iterator[str]:
        return self._iterate(self.ask, volume, question, **kwargs)

    def report_batch(self, volumes: Sequence[VolumeLike], *, batch_size: int = 4,
                     progress: Callable[[int], None] | None = None, **settings) -> list[str]:
        """Reports for many volumes, encoded and generated ``batch_size`` at a time (greedy: same
        text as one by one)."""
        settings = REPORT_SETTINGS.updated(**settings)
        prompt = prompts.report_prompt(self.num_image_tokens)
        reports: list[str] = []
        for start in range(0, len(volumes), batch_size):
            chunk = volumes[start:start + batch_size]
            tokens = torch.cat([self.encode(v) for v in chunk])
            reports += self._generate_batch(tokens, [prompt] * len(chunk), settings)
            if progress is not None:
                progress(len(chunk))
        return reports

    def _iterate(self, method, *args, **kwargs) -> Iterator[str]:
        pieces: queue.Queue = queue.Queue()
        done = object()
        cancel = kwargs.setdefault("cancel", CancelToken())
        failure: list[BaseException] = []

        def run() -> None:
            try:
                method(*args, on_token=pieces.put, **kwargs)
            except BaseException as exc:  # re-raised in the consumer's thread
                failure.append(exc)
            finally:
                pieces.put(done)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            while (piece := pieces.get()) is not done:
                yield piece
        finally:
            cancel.cancel()  # a consumer that stops early stops the generation too
            worker.join()
        if failure:
            raise failure[0]

    def _tokenize(self, prompts_: Sequence[str]) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = "left"
        # Special tokens as the tokenizer adds them: M3D-LaMed's BOS is part of the official layout.
        batch = self.tokenizer(list(prompts_), return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    @torch.inference_mode()
    def _generate(self, image_tokens, prompt, settings: GenerationSettings, on_token, cancel) -> str:
        pieces: list[str] = []

        def collect(piece: str) -> None:
            pieces.append(piece)
            if on_token is not None:
                on_token(piece)

        streamer = CallbackStreamer(self.tokenizer, collect)
        with self._lock, _friendly_oom("generating text"):
            self.model.generate(image_tokens, **self._tokenize([prompt]), streamer=streamer,
                                stopping_criteria=stopping_criteria(cancel), **self._special_ids(),
                                **settings.generate_kwargs())
        return "".join(pieces).strip()

    @torch.inference_mode()
    def _generate_batch(self, image_tokens, prompts_: Sequence[str], settings: GenerationSettings) -> list[str]:
        with self._lock, _friendly_oom("generating text"):
            out = self.model.generate(image_tokens, **self._tokenize(prompts_), **self._special_ids(),
                                      **settings.generate_kwargs())
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _special_ids(self) -> dict:
        return {"eos_token_id": self.stop_token_ids, "pad_token_id": self.tokenizer.pad_token_id}

    @torch.inference_mode()
    def _best_choice(self, image_tokens, prompt: str, choices: Sequence[str]) -> str:
        """The choice whose answer text (``"B. spleen"`` + EOS) the model finds most likely, by mean
        token log-likelihood; tokenised as in training: prompt ids, then " " + answer ids."""
        candidates = [prompts.choice_answer(letter, choices) for letter in prompts.LETTERS[:len(choices)]]
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        scores = []
        with self._lock:
            for answer in candidates:
                answer_ids = self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([prompt_ids + answer_ids + [self.tokenizer.eos_token_id]], device=self.device)
                labels = ids.clone()
                labels[:, :len(prompt_ids)] = -100
                scores.append(-float(self.model(image_tokens=image_tokens, input_ids=ids, labels=labels).loss))
        return candidates[int(np.argmax(scores))]

    def _fit_history(self, question, history, choices, max_new_tokens) -> list[tuple[str, str]]:
        limit = self.model.config.max_context
        while True:
            prompt = prompts.vqa_prompt(self.num_image_tokens, question, history, choices)
            needed = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) + max_new_tokens
            if needed <= limit:
                return history
            if not history:
                raise Med3DVLMError(f"The question is too long for the model's context ({needed} of {limit} "
                                    "tokens); shorten it or lower max_new_tokens.")
            history = history[1:]
            warnings.warn("The conversation is longer than the model's context; the oldest turn was "
                          "left out of the prompt.", ContextWarning, stacklevel=3)

    # ----- MRI abnormality detection (MedMAP) -----------------------------------------------------
    def detect(self, volume_or_study, region: Region | None = None) -> DetectionResult:
        """Per-abnormality probabilities for an MRI volume or study (a list of volumes, or a
        ``{sequence: volume}`` mapping), or for ``region`` of it (RAS mm corners); volumes may be
        paths. Reads as ``{label: probability}``."""
        study = self._study(volume_or_study)
        with self._lock, _friendly_oom("detecting abnormalities"):
            return self.detector.detect(study, region)

    def _study(self, volume_or_study):
        if self.detector is None:
            raise ModelError(f"Model {self.model_name} has no MRI abnormality detector; detection needs a "
                             f"'{DETECTOR_FOLDER}' subfolder with a MedMAP detector.")
        if isinstance(volume_or_study, dict):
            return {seq: self.as_volume(v) for seq, v in volume_or_study.items()}
        if isinstance(volume_or_study, list):
            return [self.as_volume(v) for v in volume_or_study]
        return self.as_volume(volume_or_study)

    # ----- what the model saw, and where its answers came from ---------------------------------------
    def model_view(self, volume: VolumeLike, region: Region | None = None, window: Window | None = None) -> ModelView:
        """What the model receives from the volume, placed over the scan (see ``model_view.ModelView``)."""
        return model_view(self.as_volume(volume), self.preprocess_config, region, window)

    def explain(self, volume: VolumeLike, question: str | None = None, answer: str | None = None,
                region: Region | None = None, *, window: Window | None = None, choices: Sequence[str] | None = None,
                history: Sequence[tuple[str, str]] = (), method: str = "smoothgrad", samples: int = 8,
                save_memory: bool = False, on_token: TokenCallback | None = None, cancel: CancelToken | None = None,
                progress: Progress | None = None) -> Evidence:
        """Evidence map of an answer on the volume's own grid (see ``explained.Evidence``).

        ``question`` None explains the report, else the answer to the question (with ``choices``
        and earlier ``history`` as for ``ask``); ``answer`` None generates it greedily first
        (streamed to ``on_token``). ``method`` "smoothgrad" or "integrated" with ``samples``
        forward and backward passes, ``progress(done, samples)`` after each; ``save_memory`` keeps
        the backward's activations in host memory (a 7B model on one GPU). ``cancel`` stops it
        with Cancelled: an unfinished map or answer is not one to show.
        """
        volume = self.as_volume(volume)
        if question is None:
            prompt = prompts.report_prompt(self.num_image_tokens)
            if answer is None:
                answer = self.report(volume, region=region, window=window, do_sample=False, on_token=on_token,
                                     cancel=cancel)
        else:
            question = _question(question)
            if answer is None:
                answer = self.ask(volume, question, history=history, choices=choices, region=region, window=window,
                                  do_sample=False, on_token=on_token, cancel=cancel)
            history = self._fit_history(question, list(history), choices, 0)
            prompt = prompts.vqa_prompt(self.num_image_tokens, question, history, choices)
        if cancel is not None and cancel.cancelled:
            raise Cancelled("The answer to explain was stopped before it was complete.")
        with self._lock, _friendly_oom("explaining the answer"):
            return explain_answer(self.model, self.tokenizer, volume, self.preprocess_config, prompt, answer, question,
                                  region=region, window=window, device=self.device, method=method, samples=samples,
                                  save_memory=save_memory, cancel=cancel, progress=progress)

    def explain_detection(self, volume_or_study, label: str | tuple[str, str], region: Region | None = None, *,
                          method: str = "smoothgrad", samples: int = 8, cancel: CancelToken | None = None,
                          progress: Progress | None = None) -> dict[str, Evidence]:
        """Evidence for one abnormality score (``"cyst in the liver"`` or ``("liver", "cyst")``): a
        map on each volume's grid, by sequence (see ``Detector.explain``)."""
        study = self._study(volume_or_study)
        with self._lock, _friendly_oom("explaining the score"):
            return self.detector.explain(study, label, region, method=method, samples=samples, cancel=cancel,
                                         progress=progress)

    # ----- retrieval -------------------------------------------------------------------------------
    def retrieve(self, volume: VolumeLike, texts: Sequence[str]) -> list[tuple[int, float]]:
        """Rank ``texts`` for a volume: ``(index, score)`` best first, score = SigLIP match probability."""
        scores = self.similarities([volume], texts)[0]
        return sorted(enumerate(scores.tolist()), key=lambda item: -item[1])

    @torch.inference_mode()
    def similarities(self, volumes: Sequence[VolumeLike], texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """SigLIP match probabilities, (volumes x texts). Volumes and texts are embedded ``batch_size``
        at a time: in one pass with autograd on, 200 phantoms grew the evaluation to ~15 GB."""
        if self.retrieval is None:
            raise ModelError(f"Model {self.model_name} has no retrieval (SigLIP) towers; retrieval needs a "
                             "model folder with a 'siglip' subfolder.")
        dtype = next(self.retrieval.parameters()).dtype
        images, embedded = [], []
        for i in range(0, len(volumes), batch_size):
            pixels = torch.cat([self.pixels(v) for v in volumes[i:i + batch_size]]).to(dtype)
            images.append(self.retrieval.encode_image(pixels))
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                                   max_length=self.retrieval.max_text_length, add_special_tokens=False,
                                   padding_side="right")  # BERT's positions start at 0 for every text
            embedded.append(self.retrieval.encode_text(batch["input_ids"].to(self.device),
                                                       batch["attention_mask"].to(self.device)))
        return torch.sigmoid(self.retrieval.match_logits(torch.cat(images), torch.cat(embedded))).float().cpu()
