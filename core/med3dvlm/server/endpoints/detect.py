"""POST /detect: MRI abnormality scores (MedMAP) for one volume or a multi-sequence study, or for a
region of it (``region``: two opposite corners in RAS mm; recorded in the provenance)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field

from ..auth import require_token
from .common import RegionBox, RegionField, framing, stored_volume, stream_job

router = APIRouter(dependencies=[Depends(require_token)])


class DetectRequest(BaseModel):
    volumes: list[str] = Field(min_length=1, max_length=12, description="digests of the study's volumes")
    sequences: list[str] | None = Field(None, description="each volume's MRI sequence, in order (else guessed)")
    region: RegionBox = RegionField


@router.post("/detect")
async def detect(body: DetectRequest, request: Request):
    volumes = [stored_volume(request, digest) for digest in body.volumes]
    if body.sequences is not None and len(body.sequences) != len(volumes):
        raise HTTPException(422, f"{len(body.sequences)} sequences were named for {len(volumes)} volumes; "
                                 "name one per volume, in the same order.")
    study = dict(zip(body.sequences, volumes)) if body.sequences else volumes
    if len(volumes) == 1 and not body.sequences:
        study = volumes[0]
    framed = framing(request, volumes, body.region, detector=True)

    def work(pipeline, job):
        job.emit("status", stage="generating")
        detection = pipeline.detect(study, **framed).to_dict()
        return {"detection": detection, "provenance": pipeline.provenance("detect", study, **framed)}
    return stream_job(request, "detect", work)
