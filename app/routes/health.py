"""Liveness and readiness, for the load balancer and the orchestrator."""

from typing import Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from app.deps import ServicesDep
from app.metrics import exposition
from app.problems import ProblemError, problem_doc

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"


@router.get("/healthz", name="healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: 200 while the process runs."""
    return Health()


@router.get(
    "/readyz",
    name="readyz",
    response_model=Health,
    responses={503: problem_doc("draining for shutdown")},
)
async def readyz(services: ServicesDep) -> Health:
    """Readiness: 200 when configured and accepting deliveries; 503 while draining on shutdown."""
    # 503 from SIGTERM on, while deliveries are still served for drain_delay: a load balancer
    # sees the instance leave before any delivery is refused (app/cli.py, _Signals).
    if not services.ready:
        raise ProblemError(
            503,
            "draining for shutdown: take this instance out of rotation; new deliveries are refused shortly",
            headers={"Retry-After": "5"},
        )
    return Health()


@router.get(
    "/metrics",
    name="metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}},
        401: problem_doc("a key is required (only with mailrelay.auth.metrics_requires_key)"),
    },
)
async def metrics(request: Request, services: ServicesDep) -> Response:
    """Prometheus metrics of every worker process."""
    runtime = services.current
    if runtime.config.mailrelay.auth.metrics_requires_key:
        runtime.keyring.identify(request)
    body, content_type = exposition()
    return Response(body, media_type=content_type)
