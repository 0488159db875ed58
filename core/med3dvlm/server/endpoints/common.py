"""What the job endpoints share: finding an uploaded volume, checking a region and window, keeping
a volume a job made for download, and streaming a job's events."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from fastapi import HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from ...errors import Med3DVLMError
from ...model_input import parse_window
from ...region import crop_to_region, parse_region
from ...volume import Volume
from ..jobs import Job, QueueFull, Work
from ...wire import EVENTS_MEDIA_TYPE, FINAL_EVENTS, event_line, is_digest, volume_digest

Digest = Field(pattern=r"^[0-9a-f]{32}$", description="content digest of an uploaded volume")
Corner = tuple[float, float, float]
RegionBox = tuple[Corner, Corner] | None
RegionField = Field(None, description="only this box of the volume: two opposite corners (R, A, S) in mm; the "
                                      "volume is cropped to it, with a 10 mm margin, before preprocessing")
WindowField = Field(None, description="(centre, width) of the CT window shown to the model instead of the "
                                      "preset's (the model was trained with the preset's)")


def stored_volume(request: Request, digest: str) -> Volume:
    volume = request.app.state.volumes.get(digest) if is_digest(digest) else None
    if volume is None:
        raise HTTPException(404, f"The server does not have volume {digest}; upload it first (PUT /volumes/{digest}).")
    return volume


def framing(request: Request, volumes: Sequence[Volume], region: RegionBox, window: tuple[float, float] | None = None,
            detector: bool = False) -> dict:
    """``region`` and ``window`` as the pipeline's keyword arguments (those given), refused now with
    422 and one sentence when they cannot frame ``volumes``: an empty box, one outside a volume, one
    smaller than the model's input allows, a window without a width. How small a region may be
    depends on the model (``detector``: on the MRI detector), known once it has loaded; a job
    queued before then refuses such a region itself, with the same sentence."""
    kwargs = {}
    try:
        if window is not None:
            kwargs["window"] = parse_window(window)
        if region is not None:
            kwargs["region"] = tuple(tuple(corner) for corner in parse_region(region).tolist())
            pipeline = request.app.state.jobs.pipeline
            config = getattr(getattr(pipeline, "detector", None) if detector else pipeline, "preprocess_config", None)
            for volume in volumes if config is not None else ():
                crop_to_region(volume, kwargs["region"], config.shape, config.orientation)  # a view: no copy
    except Med3DVLMError as error:
        raise HTTPException(422, str(error)) from None
    return kwargs


def keep_result(request: Request, volume: Volume) -> str:
    """Keep a volume a job made (an evidence map, the model's view) for its client to download from
    GET /results/{digest}; returns that digest."""
    digest = volume_digest(volume)
    request.app.state.results.put(digest, volume)
    return digest


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
