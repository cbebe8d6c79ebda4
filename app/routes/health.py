"""Liveness and readiness, for the load balancer and the orchestrator."""

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from app.deps import RuntimeDep
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
async def readyz(runtime: RuntimeDep) -> Health:
    """Readiness: 200 when configured and accepting deliveries; 503 while draining on shutdown."""
    if runtime.draining:
        raise ProblemError(
            503,
            "draining for shutdown; not accepting deliveries",
            headers={"Retry-After": "5"},
        )
    return Health()
