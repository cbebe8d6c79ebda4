"""Dependencies shared by the routes."""

from collections.abc import Iterable
from typing import Annotated

from fastapi import Depends, Path, Request

from app.lifespan import Runtime
from app.problems import ProblemError
from relays.base import Relay


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
RelayName = Annotated[str, Path(description="a relay name from the configuration", examples=["outbound"])]


def unknown_relay(name: str, configured: Iterable[str]) -> ProblemError:
    return ProblemError(
        404,
        f"no relay named {name!r}; configured: {', '.join(sorted(configured)) or 'none'}",
    )


def get_relay(name: RelayName, runtime: RuntimeDep) -> Relay:
    relay = runtime.relays.get(name)
    if relay is None:
        raise unknown_relay(name, runtime.relays)
    return relay


RelayDep = Annotated[Relay, Depends(get_relay)]
