"""``create_app``: the Litestar application.

Clients are built in the lifespan from a factory (never at import) and handed
to handlers through dependency injection as ``ctx``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin

from api.context import MAX_BODY_BYTES, ApiContext
from api.errors import handle
from api.routes import ROUTES
from api.telemetry import TelemetryMiddleware

ContextFactory = Callable[[], Awaitable[ApiContext]]
ContextCloser = Callable[[ApiContext], Awaitable[None]]


def create_app(open_context: ContextFactory, close_context: ContextCloser) -> Litestar:
    holder: dict[str, ApiContext] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        ctx = await open_context()
        holder["ctx"] = ctx
        if ctx.cache is not None:
            ctx.background.append(asyncio.create_task(ctx.cache.watch(), name="cache-watch"))
        try:
            yield
        finally:
            for task in ctx.background:
                task.cancel()
            await asyncio.gather(*ctx.background, return_exceptions=True)
            await close_context(ctx)

    def provide_ctx() -> ApiContext:
        return holder["ctx"]

    return Litestar(
        route_handlers=ROUTES,
        lifespan=[lifespan],
        dependencies={"ctx": Provide(provide_ctx, sync_to_thread=False)},
        exception_handlers={Exception: handle},
        middleware=[TelemetryMiddleware],
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(
            title="AgentMesh trust ledger",
            version="1.0.0",
            path="/schema",
            render_plugins=[SwaggerRenderPlugin()],
        ),
        debug=False,
        logging_config=None,  # one logging style: agentmesh.logs configures the root logger
    )
