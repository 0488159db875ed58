"""GET /results/{digest}: a volume a job made (an evidence map, the model's view), named by the
digest its ``done`` event gave, in the form volumes are uploaded in (med3dvlm.wire): the header in
``X-Med3DVLM-Volume``, the voxels as raw bytes, deflated when the client accepts it
(``Accept-Encoding: deflate``, as remote clients send). A result is kept until newer ones need
the room (``max_result_bytes``); the client checks it against its digest."""

from __future__ import annotations

import zlib

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool

from ...volume import Volume
from ..auth import require_token
from ...wire import VOLUME_HEADER, header_text, is_digest, wire_chunks, wire_header

router = APIRouter(dependencies=[Depends(require_token)])


def _body(volume: Volume, deflate: bool) -> tuple[dict, bytes]:
    data = b"".join(wire_chunks(volume))
    return wire_header(volume), zlib.compress(data, 1) if deflate else data


@router.get("/results/{digest}")
async def result(digest: str, request: Request) -> Response:
    volume = request.app.state.results.get(digest) if is_digest(digest) else None
    if volume is None:
        raise HTTPException(404, f"The server no longer has result {digest} (it keeps the latest ones only); "
                                 "ask for it again.")
    deflate = "deflate" in request.headers.get("accept-encoding", "")
    header, body = await run_in_threadpool(_body, volume, deflate)
    headers = {VOLUME_HEADER: header_text(header), **({"Content-Encoding": "deflate"} if deflate else {})}
    return Response(body, media_type="application/octet-stream", headers=headers)
