"""What the job endpoints share: finding an uploaded volume, and streaming a job's events."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from ...volume import Volume
from ..jobs import Job, QueueFull, Work
from ...wire import EVENTS_MEDIA_TYPE, FINAL_EVENTS, event_line, is_digest

Digest = Field(pattern=r"^[0-9a-f]{32}$", description="content digest of an uploaded volume")


def stored_volume(request: Request, digest: str) -> Volume:
    volume = request.app.state.volumes.get(digest) if is_digest(digest) else None
    if volume is None:
        raise HTTPException(404, f"The server does not have volume {digest}; upload it first (PUT /volumes/{digest}).")
    return volume


class Generation(BaseModel):
    """Generation settings of one request (the model's defaults where omitted)."""

    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    do_sample: bool | None = None
    temperature: float | None = Field(None, gt=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)

    def kwargs(self) -> dict:
        return self.model_dump(exclude_none=True)


def stream_job(request: Request, kind: str, work: Work) -> StreamingResponse:
    """Queue ``work`` and stream its events; a client that goes away cancels it."""
    job = Job(kind, work)
    try:
        request.app.state.jobs.submit(job)
    except QueueFull as error:
        raise HTTPException(503, str(error)) from None
    return StreamingResponse(_events(job), media_type=EVENTS_MEDIA_TYPE,
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _events(job: Job) -> AsyncIterator[bytes]:
    try:
        while True:
            batch = [await job.events.get()]
            while batch[-1]["event"] not in FINAL_EVENTS and not job.events.empty():
                batch.append(job.events.get_nowait())  # tokens that came meanwhile: one write
            yield b"".join(event_line(**event) for event in batch)
            if batch[-1]["event"] in FINAL_EVENTS:
                return
    finally:  # normal end: a no-op; disconnect: Starlette cancels this generator, and the job stops
        job.cancel.cancel()
