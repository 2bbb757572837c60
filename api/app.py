"""``create_app``: the Litestar application.

Clients are built in the lifespan from a factory (never at import) and handed
to handlers through dependency injection as ``ctx``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Callable

from litestar import Litestar, Router
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import OpenAPIRenderPlugin, SwaggerRenderPlugin
from litestar.static_files import create_static_files_router

from api.context import MAX_BODY_BYTES, ApiContext
from api.errors import handle
from api.fastlane import SignedReportLane, TrustReadLane
from api.openapi import document
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
        _freeze_startup_objects()
        try:
            yield
        finally:
            for task in ctx.background:
                task.cancel()
            await asyncio.gather(*ctx.background, return_exceptions=True)
            await close_context(ctx)

    def provide_ctx() -> ApiContext:
        return holder["ctx"]

    app = Litestar(
        route_handlers=[*ROUTES, *_swagger_assets()],
        lifespan=[lifespan],
        dependencies={"ctx": Provide(provide_ctx, sync_to_thread=False)},
        exception_handlers={Exception: handle},
        # Outermost first: the telemetry times the fast lane's answers too.
        middleware=[
            TelemetryMiddleware,
            DefineMiddleware(TrustReadLane, context=provide_ctx),
            DefineMiddleware(SignedReportLane, context=provide_ctx),
        ],
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(
            title="AgentMesh trust ledger",
            version="1.0.0",
            path="/schema",
            render_plugins=_render_plugins(),
        ),
        debug=False,
        logging_config=None,  # one logging style: agentmesh.logs configures the root logger
    )
    # Litestar's document, then corrected: problem responses, security, typed bodies.
    # The dict is cached and served as is, so correcting it once here is enough.
    document(app.plugins.get(OpenAPIPlugin).provide_openapi_schema())
    return app


def _freeze_startup_objects() -> None:
    """Move what start-up built (modules, the app, its routes, the clients: hundreds
    of thousands of objects) out of the garbage collector's sight. Requests in
    flight when a young collection runs get promoted to the oldest generation, so
    under load the collector ran a full collection every few seconds, walking all
    of start-up's objects each time: 80-200 ms with every request held behind it,
    the whole p99 of the trust read. Frozen objects are never collected, and none
    of these is garbage while the process runs."""
    gc.collect()
    gc.freeze()


ASSETS = "/schema/assets"


def _swagger_dir() -> str | None:
    """Swagger UI's files from the ``swagger-ui-bundle`` wheel (None without it)."""
    try:
        from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]
    except ImportError:
        return None
    return str(swagger_ui_path)


def _swagger_assets() -> list[Router]:
    directory = _swagger_dir()
    if directory is None:
        return []
    return [
        create_static_files_router(
            path=ASSETS, directories=[directory], include_in_schema=False, name="swagger-assets"
        )
    ]


def _render_plugins() -> list[OpenAPIRenderPlugin]:
    """Swagger UI at /schema/swagger, its scripts and styles served by this API (works
    offline; no CDN). Without the wheel, Litestar's CDN defaults."""
    if _swagger_dir() is None:
        return [SwaggerRenderPlugin()]
    return [
        SwaggerRenderPlugin(
            js_url=f"{ASSETS}/swagger-ui-bundle.js",
            css_url=f"{ASSETS}/swagger-ui.css",
            standalone_preset_js_url=f"{ASSETS}/swagger-ui-standalone-preset.js",
            favicon=f"<link rel='icon' type='image/png' href='{ASSETS}/favicon-32x32.png'>",
        )
    ]
