"""POST /jobs/{id}/cancel: stop a running or waiting job by the id of its ``queued`` event."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request

from ..auth import require_token

router = APIRouter(dependencies=[Depends(require_token)])


@router.post("/jobs/{job_id}/cancel")
async def cancel(job_id: str, request: Request) -> dict:
    if not request.app.state.jobs.cancel(job_id):
        raise HTTPException(404, f"No running or waiting job {job_id}; it has finished already.")
    return {"cancelled": job_id}
