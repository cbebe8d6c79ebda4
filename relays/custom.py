"""`custom`: a relay built by an importable factory, `"package.module:symbol"`."""

import importlib
from collections.abc import Callable
from typing import Any

from relays.base import Relay, is_relay
from schemas.config import ConfigError
from schemas.relay_options import CustomOptions


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
    return obj  # type: ignore[no-any-return]


def load_custom_relay(name: str, options: CustomOptions, context: object = None) -> Relay:
    """Call the factory once with every option of the relay; its result must be a Relay."""
    path = f"relay.{name}.factory"
    try:
        factory = import_factory(options.factory)
    except ValueError as exc:
        raise ConfigError.at(path, str(exc)) from None
    try:
        relay = factory(options.model_dump())
    except Exception as exc:
        raise ConfigError.at(path, f'factory "{options.factory}" raised {type(exc).__name__}: {exc}') from None
    if not is_relay(relay):
        raise ConfigError.at(
            path,
            f'factory "{options.factory}" returned {type(relay).__name__}, which is not a relay '
            "(it needs `async def deliver(envelope)` and `async def aclose()`)",
        )
    return relay
