"""POST /report and POST /ask: streamed text about an uploaded volume."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from ... import prompts
from ..auth import require_token
from .common import Digest, Generation, stored_volume, stream_job

router = APIRouter(dependencies=[Depends(require_token)])
Text = Field(min_length=1, max_length=4000)


class ReportRequest(BaseModel):
    volume: str = Digest
    instruction: str = Field(prompts.REPORT_PROMPT, min_length=1, max_length=4000)
    generation: Generation = Generation()


class AskRequest(BaseModel):
    volume: str = Digest
    question: str = Text
    history: list[tuple[str, str]] = Field([], max_length=64)
    choices: list[str] | None = Field(None, min_length=2, max_length=len(prompts.LETTERS))
    generation: Generation = Generation()


def _start(pipeline, job, volume):
    """Encode (cached per volume) with progress, then a callback that streams each token."""
    job.emit("status", stage="encoding")
    pipeline.encode(volume)
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
    settings = body.generation.kwargs()

    def work(pipeline, job):
        text = generate(pipeline, volume, on_token=_start(pipeline, job, volume), cancel=job.cancel, **settings)
        return {"text": text, "provenance": pipeline.provenance(task, volume, **settings)}
    return stream_job(request, task, work)


@router.post("/report")
async def report(body: ReportRequest, request: Request):
    return _text_job(request, body, "report",
                     lambda pipeline, volume, **kw: pipeline.report(volume, instruction=body.instruction, **kw))


@router.post("/ask")
async def ask(body: AskRequest, request: Request):
    return _text_job(request, body, "ask", lambda pipeline, volume, **kw: pipeline.ask(
        volume, body.question, history=body.history, choices=body.choices, **kw))
