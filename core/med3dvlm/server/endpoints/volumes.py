"""Volumes: GET /volumes/{digest} (is it here?), PUT /volumes/{digest} (upload once), and
POST /volumes/from-path (read a file on the server, only inside the folder the operator allowed)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from ...errors import VolumeError
from ...readers import read_volume
from ...wire import VOLUME_HEADER, is_digest, parse_header, volume_digest, voxel_bytes
from ..auth import require_token
from ..config import human_size
from ..volumes import UploadError, decode_upload

router = APIRouter(dependencies=[Depends(require_token)])
UPLOAD_SLACK = 1 << 16  # deflate may make incompressible voxels a little larger


@router.get("/volumes/{digest}")
async def has_volume(digest: str, request: Request) -> dict:
    if not is_digest(digest) or request.app.state.volumes.get(digest) is None:
        raise HTTPException(404, f"The server does not have volume {digest}.")
    return {"digest": digest}


@router.put("/volumes/{digest}", status_code=201)
async def upload(digest: str, request: Request) -> dict:
    if not is_digest(digest):
        raise HTTPException(400, "A volume is named by its 32-character hexadecimal digest.")
    try:
        header = parse_header(request.headers.get(VOLUME_HEADER))
    except ValueError as error:
        raise HTTPException(400, str(error)) from None
    size, limit = voxel_bytes(header), request.app.state.config.max_volume_bytes
    sent = int(request.headers["content-length"])  # present: the BodyLimit middleware requires it
    if max(size, sent - UPLOAD_SLACK) > limit:
        raise HTTPException(413, f"The volume ({' x '.join(map(str, header['shape']))} {header['dtype']}, "
                                 f"{human_size(max(size, sent))}) is larger than this server's {human_size(limit)} "
                                 "limit; crop or downsample it.")
    encoding = request.headers.get("content-encoding", "identity")
    if encoding not in ("identity", "deflate"):
        raise HTTPException(415, f"Content-Encoding {encoding!r} is not accepted; send identity or deflate.")
    try:
        body = await request.body()  # its length was checked against the limit before it was read
    except ClientDisconnect:  # the client stopped sending (its volume changed meanwhile, or Stop)
        raise HTTPException(400, "The upload ended before all of the volume arrived.") from None
    try:
        volume = await run_in_threadpool(decode_upload, digest, header, body, encoding)
    except UploadError as error:
        raise HTTPException(400, str(error)) from None
    except VolumeError as error:
        raise HTTPException(422, str(error)) from None
    request.app.state.volumes.put(digest, volume)
    return {"digest": digest}


class PathRequest(BaseModel):
    path: str = Field(min_length=1, max_length=4096)


@router.post("/volumes/from-path")
async def from_path(body: PathRequest, request: Request) -> dict:
    folder = request.app.state.config.allowed_folder
    if folder is None:
        raise HTTPException(403, "This server reads no files from its own disk; upload the volume instead "
                                 "(its operator can allow one folder with --allow-folder).")
    path = (folder / body.path).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise HTTPException(403, f"{body.path} is outside the folder this server may read.")
    try:
        volume = await run_in_threadpool(read_volume, path)
    except VolumeError as error:
        raise HTTPException(422, str(error)) from None
    digest = await run_in_threadpool(volume_digest, volume)
    request.app.state.volumes.put(digest, volume)
    return {"digest": digest}

