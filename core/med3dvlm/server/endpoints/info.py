"""GET /health (no token: for load balancers) and GET /info: the model, its state and the limits."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ... import __version__
from ..auth import require_token

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/info", dependencies=[Depends(require_token)])
async def info(request: Request) -> dict:
    jobs, config, store = request.app.state.jobs, request.app.state.config, request.app.state.volumes
    answer = {"version": __version__, "state": jobs.state, "error": jobs.load_error,
              "model": request.app.state.model_label, "busy": jobs.busy, "waiting": jobs.waiting,
              "volumes": len(store), "uploads": store.uploads,
              "limits": {"max_volume_bytes": config.max_volume_bytes, "max_request_bytes": config.max_request_bytes,
                         "server_paths": config.allowed_folder is not None}}
    model = jobs.model()
    if model is not None:
        answer.update(model=model.pop("name"), **model)
    return answer
