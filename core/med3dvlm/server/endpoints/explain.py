"""POST /explain and POST /explain/score: evidence maps, where in the scan an answer came from.

/explain takes what /report or /ask took (a question or none for the report, its history and
choices, region, window) and the answer to explain (none: the model's own, generated greedily and
streamed as ``token`` events); /explain/score takes a study as /detect does and one of its labels.
While the map is made, ``status`` events say ``stage: "explaining"`` with ``done`` of ``total``
passes. The ``done`` event carries ``evidence`` (answer, question, method, peak_ras, shape,
affine, preprocessing; for a score, one such object per sequence), in which ``map`` is the
digest of the map: a float32 volume on the uploaded volume's own grid, downloaded from
GET /results/{digest} (see results.py). Stop ends the job with ``stopped: true`` and no map.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field

from ... import prompts
from ...cancel import Cancelled
from ...errors import Med3DVLMError
from ...explained import Evidence
from ..auth import require_token
from .common import Digest, RegionBox, RegionField, WindowField, framing, keep_result, stored_volume, stream_job

router = APIRouter(dependencies=[Depends(require_token)])
Method = Literal["smoothgrad", "integrated"]
Samples = Field(8, ge=1, le=64, description="forward and backward passes: more make a smoother map, in more time")


class ExplainRequest(BaseModel):
    volume: str = Digest
    question: str | None = Field(None, min_length=1, max_length=4000, description="none: the report")
    answer: str | None = Field(None, min_length=1, max_length=20000, description="none: the model's own")
    history: list[tuple[str, str]] = Field([], max_length=64)
    choices: list[str] | None = Field(None, min_length=2, max_length=len(prompts.LETTERS))
    region: RegionBox = RegionField
    window: tuple[float, float] | None = WindowField
    method: Method = "smoothgrad"
    samples: int = Samples


class ExplainScoreRequest(BaseModel):
    volumes: list[str] = Field(min_length=1, max_length=12, description="digests of the study's volumes")
    sequences: list[str] | None = Field(None, description="each volume's MRI sequence, in order (else guessed)")
    label: str = Field(min_length=1, max_length=200, description="the score's label, e.g. 'cyst in the liver'")
    region: RegionBox = RegionField
    method: Method = "smoothgrad"
    samples: int = Samples


def _progress(job):
    return lambda done, total: job.emit("status", stage="explaining", done=done, total=total)


def _found(request: Request, evidence: Evidence) -> dict:
    return {**evidence.to_dict(), "map": keep_result(request, evidence.map)}


@router.post("/explain")
async def explain(body: ExplainRequest, request: Request):
    volume = stored_volume(request, body.volume)
    framed = framing(request, [volume], body.region, body.window)

    def work(pipeline, job):
        count = 0

        def on_token(piece: str) -> None:  # the answer, when the server generates it first
            nonlocal count
            count += 1
            job.emit("token", text=piece, n=count)

        job.emit("status", stage="generating" if body.answer is None else "explaining")
        try:
            evidence = pipeline.explain(volume, body.question, body.answer, history=body.history,
                                        choices=body.choices, method=body.method, samples=body.samples,
                                        on_token=on_token, cancel=job.cancel, progress=_progress(job), **framed)
        except Cancelled:
            return {}
        return {"evidence": _found(request, evidence), "provenance": pipeline.provenance("explain", volume, **framed)}
    return stream_job(request, "explain", work)


@router.post("/explain/score")
async def explain_score(body: ExplainScoreRequest, request: Request):
    volumes = [stored_volume(request, digest) for digest in body.volumes]
    if body.sequences is not None and len(body.sequences) != len(volumes):
        raise HTTPException(422, f"{len(body.sequences)} sequences were named for {len(volumes)} volumes; "
                                 "name one per volume, in the same order.")
    study = dict(zip(body.sequences, volumes)) if body.sequences else volumes
    framed = framing(request, volumes, body.region, detector=True)
    detector = getattr(request.app.state.jobs.pipeline, "detector", None)
    if detector is not None:  # loaded: an unknown label is refused now, not in line
        try:
            detector.label_index(body.label)
        except Med3DVLMError as error:
            raise HTTPException(422, str(error)) from None

    def work(pipeline, job):
        job.emit("status", stage="explaining")
        try:
            maps = pipeline.explain_detection(study, body.label, method=body.method, samples=body.samples,
                                              cancel=job.cancel, progress=_progress(job), **framed)
        except Cancelled:
            return {}
        return {"evidence": {sequence: _found(request, evidence) for sequence, evidence in maps.items()},
                "provenance": pipeline.provenance("explain-score", study, **framed)}
    return stream_job(request, "explain", work)
