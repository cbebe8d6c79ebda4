"""`custom`: a relay built by an importable factory, `"package.module:symbol"`.

GET /relays shows a custom relay's options masked ("***"), all but those its factory
declares safe to show in a `PUBLIC_OPTIONS` attribute (a list or tuple of option names,
e.g. `PUBLIC_OPTIONS = ("region", "endpoint")` on the factory class or function).
"""

import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

from relays.base import DeliveryContext, Relay, is_relay
from schemas.config import ConfigError
from schemas.delivery import Envelope, RecipientResult
from schemas.relay_options import CustomOptions, declare_public_options

logger = logging.getLogger(__name__)


def import_factory(spec: str) -> Callable[..., Any]:
    """Import `package.module:symbol` and return the callable. Raises ValueError with the reason."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f'"{spec}" must be of the form "package.module:symbol"')
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ValueError(f'could not import module "{module_name}": no such module') from None
        raise ValueError(f'importing module "{module_name}" failed: {exc}') from None
    except Exception as exc:
        raise ValueError(f'importing module "{module_name}" failed: {type(exc).__name__}: {exc}') from None
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f'symbol "{attr_path}" not found in module "{module_name}"') from None
    if not callable(obj):
        raise ValueError(f'"{spec}" is not callable')
    public = getattr(obj, "PUBLIC_OPTIONS", ())
    if not isinstance(public, list | tuple | frozenset | set) or not all(isinstance(n, str) for n in public):
        raise ValueError(f'"{spec}": PUBLIC_OPTIONS must be a list of option names, not {public!r}')
    declare_public_options(spec, frozenset(public))
    return obj  # type: ignore[no-any-return]


def load_custom_relay(name: str, options: CustomOptions, context: object = None) -> Relay:
    """Call the factory once with every option of the relay; its result must be a Relay."""
    path = f"relay.{name}.factory"
    try:
        factory = import_factory(options.factory)
    except ValueError as exc:
        raise ConfigError.at(path, str(exc)) from None
    try:
        # The factory gets its own options (type and factory too, as before); not the ones the
        # service applies around every relay (dkim, add_missing_headers).
        relay = factory(options.model_dump(exclude={"dkim", "add_missing_headers"}))
    except Exception as exc:
        raise ConfigError.at(path, f'factory "{options.factory}" raised {type(exc).__name__}: {exc}') from None
    if not is_relay(relay):
        raise ConfigError.at(
            path,
            f'factory "{options.factory}" returned {type(relay).__name__}, which is not a relay '
            "(it needs `async def deliver(envelope, context)` and `async def aclose()`)",
        )
    if _required_positional_parameters(relay.deliver) == 1:
        logger.warning(
            "relay %r: deliver(envelope) takes no context; cut off by the deadline, all its recipients are "
            "answered possibly_delivered. Write deliver(envelope, context) and call context.data_sent()",
            name,
            extra={"event": "config_warning", "path": path},
        )
        return _WithoutContext(relay)
    return relay


def _required_positional_parameters(method: Callable[..., Any]) -> int | None:
    """How many positional arguments `method` needs (`deliver(self, envelope, timeout=30)`: one);
    None for *args or an unreadable signature."""
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in parameters)


class _WithoutContext:
    """A relay written for `deliver(envelope)`, before the context existed.

    It cannot say when the message left, so the service assumes the worst:
    from the start, every recipient may have it (a deadline answers them
    possibly_delivered rather than invite a retry that could send twice).
    """

    def __init__(self, relay: Any) -> None:
        self.relay = relay

    async def deliver(self, envelope: Envelope, context: DeliveryContext) -> list[RecipientResult]:
        await context.sending(envelope.recipients)
        results: list[RecipientResult] = await self.relay.deliver(envelope)
        return results

    async def aclose(self) -> None:
        await self.relay.aclose()
