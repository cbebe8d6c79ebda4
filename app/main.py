"""The FastAPI application, built from a configuration object (no import-time settings)."""

import logging
from collections.abc import Callable, Mapping
from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic.json_schema import models_json_schema
from starlette.types import Receive, Scope, Send

from app.config import DEFAULT_CONFIG_YAML, DEFAULT_SOURCE, parse_config
from app.lifespan import Services, make_lifespan
from app.observability import RequestContext
from app.problems import install_problem_handlers
from app.routes import batches, health
from app.routes import relays as relay_routes
from relays.base import Relay
from schemas.config import ServiceConfig
from schemas.delivery import DeliveryRequest
from schemas.problem import Problem

logger = logging.getLogger(__name__)
VERSION = "0.1.0"
DESCRIPTION = """\
Send mail from a program with one HTTP request. mailrelay hands the message to
a configured relay (SMTP via MX or to one host, LMTP, a local delivery agent,
another HTTP endpoint) and answers synchronously with every recipient's
outcome: the next hop's SMTP reply, its enhanced status code, the command it
answered and the host that gave it.
"""


def _operation_id(route: APIRoute) -> str:
    # Route names are stable and unique; clients generated from the document keep them.
    return route.name


class MailrelayApp(FastAPI):
    """FastAPI, with `POST /relays/{name}/deliver` handed straight to its endpoint.

    The framework's middleware stack, routing and dependency solving cost more
    per request than a whole blackhole delivery: `bench/run --only blackhole`
    went from 3,300 to 6,100 msg/s at c8 with this dispatch (2026-11-24). The endpoint is
    the one declared on the router, so the OpenAPI document describes what runs.
    Everything else goes through FastAPI as usual. What the route does without:
    FastAPI's OpenTelemetry hook (mailrelay has its own metrics and request ids).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._entry = RequestContext(self._dispatch)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._entry(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = relay_routes.deliver_target(scope)
        if name is None:
            await FastAPI.__call__(self, scope, receive, send)
            return
        scope["app"] = self
        scope["route"] = relay_routes.DELIVER_ROUTE
        await relay_routes.serve_deliver(name, scope, receive, send)


def create_app(
    config: ServiceConfig,
    relays: Mapping[str, Relay] | None = None,
    on_start: Callable[[Services], None] | None = None,
) -> MailrelayApp:
    """The service for `config`; `relays`, if given, are used (and closed) instead of building
    them; `on_start` is called with the Services once they exist."""
    app = MailrelayApp(
        title="mailrelay",
        version=VERSION,
        description=DESCRIPTION,
        lifespan=make_lifespan(config, relays, on_start),
        generate_unique_id_function=_operation_id,
        # FastAPI's own pages load their scripts from a public CDN at run time.
        docs_url=None,
        redoc_url=None,
    )
    if config.mailrelay.api_docs:
        _add_api_pages(app)
    install_problem_handlers(app)
    app.include_router(relay_routes.router)
    app.include_router(batches.router)
    app.include_router(health.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                tags=app.openapi_tags,
            )
            # The deliver body is read by hand (two media types), so its models are added here.
            _, extra = models_json_schema(
                [
                    (DeliveryRequest, "validation"),
                    (Problem, "serialization"),
                    (batches.BatchDelivery, "validation"),
                    (batches.BatchResultLine, "serialization"),
                ],
                ref_template="#/components/schemas/{model}",
            )
            components = document.setdefault("components", {})
            components.setdefault("schemas", {}).update(extra["$defs"])
            components["securitySchemes"] = {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key from mailrelay.auth.keys or $MAILRELAY_API_KEYS; required once any "
                    "key is configured (without keys the service listens on loopback only)",
                }
            }
            for path, operations in document.get("paths", {}).items():
                if path.startswith("/relays"):
                    for operation in operations.values():
                        operation["security"] = [{"apiKey": []}]
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


#: Where the API pages' scripts and styles are served from (fastapi-offline's copies).
ASSETS = "/docs/assets"
#: The pages may run their own inline script and the assets served here, and talk to nothing else: an
#: API key typed into "Authorize" reaches no third party.
API_PAGES_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def _add_api_pages(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc, with every script served by us, from an installed package."""
    try:
        assets = files("fastapi_offline") / "static"
    except ModuleNotFoundError:
        logger.warning("fastapi-offline is not installed: /docs and /redoc are not served")
        return
    app.mount(ASSETS, StaticFiles(directory=str(assets)), name="api-page-assets")
    headers = {"Content-Security-Policy": API_PAGES_CSP, "X-Content-Type-Options": "nosniff"}

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
        )
        page.headers.update(headers)
        return page

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        page = get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS}/favicon.png",
            with_google_fonts=False,
        )
        page.headers.update(headers)
        return page


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document; it does not depend on the configuration, so the embedded default builds it."""
    return create_app(parse_config(DEFAULT_CONFIG_YAML, DEFAULT_SOURCE).config).openapi()
