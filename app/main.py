"""The FastAPI application, built from a configuration object (no import-time settings)."""

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema
from starlette.types import Receive, Scope, Send

from app.config import DEFAULT_CONFIG_YAML, DEFAULT_SOURCE, parse_config
from app.lifespan import Services, make_lifespan
from app.observability import RequestContext
from app.problems import install_problem_handlers
from app.routes import health
from app.routes import relays as relay_routes
from relays.base import Relay
from schemas.config import ServiceConfig
from schemas.delivery import DeliveryRequest
from schemas.problem import Problem

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
    )
    install_problem_handlers(app)
    app.include_router(relay_routes.router)
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
                [(DeliveryRequest, "validation"), (Problem, "serialization")],
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


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document; it does not depend on the configuration, so the embedded default builds it."""
    return create_app(parse_config(DEFAULT_CONFIG_YAML, DEFAULT_SOURCE).config).openapi()
