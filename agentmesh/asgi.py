"""ASGI entry point for multi-worker serving: ``uvicorn --factory agentmesh.asgi:create``."""

from __future__ import annotations

from litestar import Litestar

from agentmesh.logs import configure_logging
from agentmesh.services import api_app
from agentmesh.settings import Settings


def create() -> Litestar:
    settings = Settings.from_env()
    configure_logging(settings)
    return api_app(settings)
