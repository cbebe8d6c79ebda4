"""Dependencies shared by the routes."""
# Dependencies are `async def`: FastAPI runs plain `def` ones in a worker thread, a hop per request.

from collections.abc import Iterable
from typing import Annotated

from fastapi import Depends, Path, Request

from app.auth import Principal, forbidden
from app.lifespan import Runtime, Services
from app.problems import ProblemError
from relays.base import Relay


async def get_services(request: Request) -> Services:
    services: Services = request.state.services
    return services


async def get_runtime(request: Request) -> Runtime:
    return (await get_services(request)).current


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ServicesDep = Annotated[Services, Depends(get_services)]


async def get_principal(request: Request, runtime: RuntimeDep) -> Principal:
    return runtime.keyring.identify(request)


PrincipalDep = Annotated[Principal, Depends(get_principal)]
RelayName = Annotated[str, Path(description="a relay name from the configuration", examples=["outbound"])]


def check_scope(name: str, configured: Iterable[str], principal: Principal) -> None:
    """404 for an unknown relay, 403 for one the key may not use.

    A key scoped to some relays gets 403 for unknown names too, so it cannot
    probe which relays exist.
    """
    if not principal.may_use(name):
        raise forbidden(principal, name)
    if name not in configured:
        raise ProblemError(
            404,
            f"no relay named {name!r}; configured: {', '.join(sorted(configured)) or 'none'}",
        )


def find_relay(name: str, runtime: Runtime, principal: Principal) -> Relay:
    check_scope(name, runtime.relays, principal)
    return runtime.relays[name]
