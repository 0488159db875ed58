"""POST /report and POST /ask: streamed text about an uploaded volume, or about a region of it
(``region``: two opposite corners in RAS mm) shown in a CT window of the client's (``window``);
both are recorded in the answer's provenance, and a window other than the model's is answered
with a warning (``warnings`` in the ``done`` event)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from ... import prompts
from ..auth import require_token
from .common import Digest, Generation, RegionBox, RegionField, WindowField, framing, stored_volume, stream_job

router = APIRouter(dependencies=[Depends(require_token)])
Text = Field(min_length=1, max_length=4000)


class ReportRequest(BaseModel):
    volume: str = Digest
    instruction: str = Field(prompts.REPORT_PROMPT, min_length=1, max_length=4000)
    generation: Generation = Generation()
    region: RegionBox = RegionField
    window: tuple[float, float] | None = WindowField


class AskRequest(BaseModel):
    volume: str = Digest
    question: str = Text
    history: list[tuple[str, str]] = Field([], max_length=64)
    choices: list[str] | None = Field(None, min_length=2, max_length=len(prompts.LETTERS))
    generation: Generation = Generation()
    region: RegionBox = RegionField
    window: tuple[float, float] | None = WindowField


def _start(pipeline, job, volume, framed: dict):
    """Encode (cached per volume, region and window) with progress, then a callback that streams each token."""
    job.emit("status", stage="encoding")
    pipeline.encode(volume, **framed)
    job.emit("status", stage="generating")
    count = 0

    def on_token(piece: str) -> None:
        nonlocal count
        count += 1
        job.emit("token", text=piece, n=count)
    return on_token


def _text_job(request: Request, body, task: str, generate):
    """Queue ``generate(pipeline, volume, on_token=..., cancel=..., **settings)`` as a streamed job."""
    volume = stored_volume(request, body.volume)
    settings, framed = body.generation.kwargs(), framing(request, [volume], body.region, body.window)

    def work(pipeline, job):
        text = generate(pipeline, volume, on_token=_start(pipeline, job, volume, framed), cancel=job.cancel,
                        **framed, **settings)
        return {"text": text, "provenance": pipeline.provenance(task, volume, **framed, **settings)}
    return stream_job(request, task, work)


@router.post("/report")
async def report(body: ReportRequest, request: Request):
    return _text_job(request, body, "report",
                     lambda pipeline, volume, **kw: pipeline.report(volume, instruction=body.instruction, **kw))


@router.post("/ask")
async def ask(body: AskRequest, request: Request):
    return _text_job(request, body, "ask", lambda pipeline, volume, **kw: pipeline.ask(
        volume, body.question, history=body.history, choices=body.choices, **kw))
