"""POST /retrieve: rank texts for an uploaded volume by SigLIP match probability."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from ..auth import require_token
from .common import Digest, stored_volume, stream_job

router = APIRouter(dependencies=[Depends(require_token)])


class RetrieveRequest(BaseModel):
    volume: str = Digest
    texts: list[str] = Field(min_length=1, max_length=2000)


@router.post("/retrieve")
async def retrieve(body: RetrieveRequest, request: Request):
    volume = stored_volume(request, body.volume)

    def work(pipeline, job):
        job.emit("status", stage="encoding")
        return {"ranking": [[index, score] for index, score in pipeline.retrieve(volume, body.texts)],
                "provenance": pipeline.provenance("retrieve", volume)}
    return stream_job(request, "retrieve", work)
