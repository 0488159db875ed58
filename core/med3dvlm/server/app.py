"""The FastAPI application: routers, the request-size guard and one-sentence error bodies.

    app = create_app(lambda: med3dvlm.load("demo"), ServerConfig())

``load`` runs on the job thread, so the server answers (``state: loading``) while the model loads.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .._version import __version__
from .config import ServerConfig, human_size
from .endpoints import detect, explain, generate, info, jobs, results, retrieve, view, volumes
from .jobs import JobQueue
from .volumes import VolumeStore

def create_app(load: Callable[[], object], config: ServerConfig = ServerConfig(), model_label: str = "model") -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.jobs = JobQueue(load, config.max_waiting)
        yield
        app.state.jobs.close()

    app = FastAPI(title="med3dvlm model server", version=__version__, lifespan=lifespan)
    app.state.config = config
    app.state.volumes = VolumeStore(config.max_stored_bytes)
    app.state.results = VolumeStore(config.max_result_bytes)
    app.state.model_label = model_label
    for module in (info, volumes, generate, detect, retrieve, explain, view, results, jobs):
        app.include_router(module.router)
    app.add_middleware(BodyLimit, config=config)
    app.add_exception_handler(RequestValidationError, _one_sentence)
    return app


async def _one_sentence(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI lists validation problems as objects; clients show ``detail`` to users as it is."""
    problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in error.errors())
    return JSONResponse({"detail": f"The request was refused ({problems})."}, status_code=422)


class BodyLimit:
    """Refuses a request body beyond the limit from its Content-Length, before reading it (the HTTP
    server enforces that the body is no longer than announced); a body without a length is refused.
    Volume uploads are sized by their own endpoint, which can say which volume is too large."""

    def __init__(self, app, config: ServerConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            upload = scope["method"] == "PUT" and scope["path"].startswith("/volumes/")
            length = dict(scope["headers"]).get(b"content-length")
            limit = self.config.max_request_bytes
            refusal = None
            if length is None or not length.isdigit():
                refusal = (411, "Send the request with a Content-Length header.")
            elif int(length) > limit and not upload:
                refusal = (413, f"The request ({human_size(int(length))}) is larger than this server accepts "
                                f"({human_size(limit)}).")
            if refusal is not None:
                await JSONResponse({"detail": refusal[1]}, status_code=refusal[0])(scope, receive, send)
                return
        await self.app(scope, receive, send)
