"""Dependencies shared by the routes."""
# Dependencies are `async def`: FastAPI runs plain `def` ones in a worker thread, a hop per request.

from collections.abc import Iterable
from typing import Annotated

from fastapi import Depends, Path, Request

from app.lifespan import Runtime
from app.problems import ProblemError
from relays.base import Relay


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
RelayName = Annotated[str, Path(description="a relay name from the configuration", examples=["outbound"])]


def unknown_relay(name: str, configured: Iterable[str]) -> ProblemError:
    return ProblemError(
        404,
        f"no relay named {name!r}; configured: {', '.join(sorted(configured)) or 'none'}",
    )


def find_relay(name: str, runtime: Runtime) -> Relay:
    relay = runtime.relays.get(name)
    if relay is None:
        raise unknown_relay(name, runtime.relays)
    return relay
