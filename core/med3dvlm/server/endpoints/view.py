"""POST /view: the model's view of an uploaded volume, what the model receives from it (after the
region crop, window, reorientation, crop and resize), for a viewer to lay over the scan.

The ``done`` event carries ``view``: ``box_ras`` (two opposite corners, in RAS mm, of the box of
the scan that reached the model; voxel edges), ``box_voxels`` ([start, stop) along i, j, k),
``shape``, ``affine`` (model index (d, h, w) to RAS: the input lies over the scan),
``preprocessing``, and ``volume``: the digest of the input itself (float32 in [0, 1]), downloaded
from GET /results/{digest} (see results.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from ..auth import require_token
from .common import Digest, RegionBox, RegionField, WindowField, framing, keep_result, stored_volume, stream_job

router = APIRouter(dependencies=[Depends(require_token)])


class ViewRequest(BaseModel):
    volume: str = Digest
    region: RegionBox = RegionField
    window: tuple[float, float] | None = WindowField


@router.post("/view")
async def view(body: ViewRequest, request: Request):
    volume = stored_volume(request, body.volume)
    framed = framing(request, [volume], body.region, body.window)

    def work(pipeline, job):
        job.emit("status", stage="preprocessing")
        seen = pipeline.model_view(volume, **framed)
        return {"view": {**seen.to_dict(), "volume": keep_result(request, seen.volume)},
                "provenance": pipeline.provenance("view", volume, **framed)}
    return stream_job(request, "view", work)
