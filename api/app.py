"""The HTTP API: accepts jobs and batches, reports on them, and never imports torch or transformers.

``create_app()`` reads settings at startup (not at import) and builds the services in the lifespan.
Run it with ``queueformer api`` or ``uvicorn api.app:create_app --factory``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors
from api.middleware import BodyLimit, Observe
from api.routes import batches, dashboard, embeddings, files, fine_tuning, health, jobs, models
from api.services import Services
from api.upkeep import Upkeep
from queueformer.contract import VERSION
from queueformer.contract.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = Services.build(settings)
        upkeep = Upkeep(app.state.services)
        upkeep.start()
        try:
            yield
        finally:
            upkeep.stop()
            app.state.services.close()

    app = FastAPI(
        title="queueformer",
        version=VERSION,
        summary="A job queue for Hugging Face transformer models: generate, fill-mask, translate, classify, fine-tune.",
        lifespan=lifespan,
    )
    errors.install(app)
    routers = (health, models, jobs, embeddings, files, batches, fine_tuning, dashboard)
    for module in routers:
        app.include_router(module.router)

    app.add_middleware(BodyLimit, limit=settings.api.max_body_bytes, limit_for=_upload_limit(settings))
    app.add_middleware(Observe)  # outermost: 413s from BodyLimit are counted too
    return app


def _upload_limit(settings: Settings) -> Callable[[str], int | None]:
    def limit_for(path: str) -> int | None:
        # File uploads carry batch inputs and training data: they get the tenant upload cap instead.
        return settings.quota.max_upload_bytes + 64 * 1024 if path.rstrip("/") == "/v1/files" else None

    return limit_for
