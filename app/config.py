"""Load a configuration file: YAML, slimta's `relay:` section, key-path errors."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ValidationError
from pydantic_core import ErrorDetails

from relays.custom import import_factory
from schemas.config import ConfigError, ConfigProblem, ServiceConfig, check_key, format_path, key_digest
from schemas.relay_options import OPTIONS_BY_TYPE, CustomOptions, ehlo_warning

#: Used when neither --config nor $MAILRELAY_CONFIG names a file.
DEFAULT_CONFIG_YAML = """\
# mailrelay's embedded default: one relay that accepts every message and discards it.
relay:
  blackhole:
    type: blackhole
"""
DEFAULT_SOURCE = "<embedded default>"
#: Sections of the file that are ours; slimta's other sections are ignored.
OWN_SECTIONS = ("relay", "mailrelay")
_MAX_INCLUDE_DEPTH = 8


@dataclass(frozen=True)
class LoadedConfig:
    """A valid configuration, where it came from, and what was worth a warning."""

    config: ServiceConfig
    source: str
    warnings: list[ConfigProblem] = field(default_factory=list)


def load_config(path: str | None) -> LoadedConfig:
    """The file at `path`, else $MAILRELAY_CONFIG, else the embedded default."""
    path = path or os.environ.get("MAILRELAY_CONFIG") or None
    if path is None:
        return parse_config(DEFAULT_CONFIG_YAML, DEFAULT_SOURCE)
    return parse_config(_read(Path(path)), path, base_dir=Path(path).parent)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError.at("", f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError.at("", f"{path}: is a directory, not a configuration file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError.at("", f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError.at("", f"{path}: cannot read: {exc.strerror}") from None


def parse_config(text: str, source: str, base_dir: Path | None = None) -> LoadedConfig:
    """Validate a configuration document. Raises ConfigError listing every problem
    (and the warnings found before it)."""
    warnings: list[ConfigProblem] = []
    try:
        return _parse(text, source, base_dir or Path.cwd(), warnings)
    except ConfigError as exc:
        exc.warnings = exc.warnings or warnings
        raise


def _parse(text: str, source: str, base_dir: Path, warnings: list[ConfigProblem]) -> LoadedConfig:
    """The loader's steps in order. Past the document's shape every step adds to one list of
    problems, so that a broken file is reported whole."""
    sections = _own_sections(_parse_yaml(text, source, warnings), source, base_dir, warnings)
    relays = _clean_relays(sections["relay"], warnings)
    candidate = {**sections, "relay": relays}
    problems = _apply_environment(candidate)
    config, found = _validate(candidate)
    problems += found
    problems += _custom_relay_problems(relays, problems)
    if problems or config is None:
        raise ConfigError(problems, warnings)
    warnings.extend(_ehlo_warnings(config, relays))
    return LoadedConfig(config=config, source=source, warnings=warnings)


def _own_sections(document: Any, source: str, base_dir: Path, warnings: list[ConfigProblem]) -> dict[str, Any]:
    """Our sections of the document with `!include` resolved, `relay` among them and a mapping.
    slimta's other sections are warned about and ignored. A document of the wrong shape is
    raised as its one problem: nothing else in it could be checked."""
    if document is None:
        raise ConfigError.at("", f"{source}: the file is empty; it needs a `relay:` section")
    if not isinstance(document, dict):
        raise ConfigError.at("", f"{source}: the top level must be a mapping of sections such as `relay:`")
    warnings.extend(
        ConfigProblem(path=str(section), message="section not used by mailrelay; ignored")
        for section in document
        if section not in OWN_SECTIONS
    )
    ours = {k: _resolve_tags(document[k], k, base_dir, warnings) for k in OWN_SECTIONS if k in document}
    relays = ours.get("relay")
    if not relays:
        raise ConfigError.at("relay", "missing or empty; configure at least one relay")
    if not isinstance(relays, dict):
        raise ConfigError.at("relay", "must be a mapping of relay names to their options")
    return ours


def _clean_relays(relays: dict[Any, Any], warnings: list[ConfigProblem]) -> dict[Any, Any]:
    """Every relay's options without the keys its type does not know, each dropped with a warning."""
    return {name: _drop_unknown_keys(f"relay.{name}", options, warnings) for name, options in relays.items()}


def _apply_environment(candidate: dict[str, Any]) -> list[ConfigProblem]:
    """The environment variables with fixed names; they win over the file, since containers
    set them per deployment. Returns what is wrong with them."""
    section = candidate.get("mailrelay")
    settings = dict(section) if isinstance(section, dict) else {}
    problems: list[ConfigProblem] = []
    if nameservers := os.environ.get("MAILRELAY_DNS_NAMESERVERS", "").strip():
        settings["dns_nameservers"] = [ns.strip() for ns in nameservers.split(",") if ns.strip()]
    if redis_url := os.environ.get("MAILRELAY_REDIS_URL", "").strip():
        idempotency = settings.get("idempotency")
        settings["idempotency"] = {**(idempotency if isinstance(idempotency, dict) else {}), "redis_url": redis_url}
    if api_keys := os.environ.get("MAILRELAY_API_KEYS", "").strip():
        added, problems = _environment_keys(api_keys)
        auth = settings.get("auth")
        auth = dict(auth) if isinstance(auth, dict) else {}
        keys = auth.get("keys")
        auth["keys"] = [*(keys if isinstance(keys, list) else []), *added]
        settings["auth"] = auth
    if settings or section is not None:
        candidate["mailrelay"] = settings
    return problems


def _environment_keys(api_keys: str) -> tuple[list[dict[str, Any]], list[ConfigProblem]]:
    """$MAILRELAY_API_KEYS as key entries allowed every relay (named env-1, env-2, ...), and
    the problems of the keys refused."""
    added: list[dict[str, Any]] = []
    problems = []
    for n, secret in enumerate((k.strip() for k in api_keys.split(",") if k.strip()), start=1):
        try:
            digest = key_digest(check_key(secret, f"$MAILRELAY_API_KEYS (key {n})"))
        except ValueError as exc:
            problems.append(ConfigProblem(path="$MAILRELAY_API_KEYS", message=str(exc)))
            continue
        added.append({"name": f"env-{n}", "sha256": digest.hex(), "relays": ["*"]})
    return added, problems


def _validate(candidate: dict[str, Any]) -> tuple[ServiceConfig | None, list[ConfigProblem]]:
    """The models' validation; once it passes, the cross-checks between sections."""
    try:
        config = ServiceConfig.model_validate(candidate)
    except ValidationError as exc:
        return None, [_problem(e) for e in exc.errors()]
    return config, _cross_checks(config)


def _cross_checks(config: ServiceConfig) -> list[ConfigProblem]:
    """Relay names in the settings must name configured relays (a typo would silently deny or not
    limit), and no API key or key name may appear twice."""
    problems = []
    known = config.relay.keys()
    for i, key in enumerate(config.mailrelay.auth.keys):
        for j, name in enumerate(key.relays):
            if name != "*" and name not in known:
                problems.append(
                    ConfigProblem(path=f"mailrelay.auth.keys[{i}].relays[{j}]", message=f"no relay named {name!r}")
                )
    for name in config.mailrelay.limits.per_relay:
        if name not in known:
            problems.append(ConfigProblem(path=f"mailrelay.limits.per_relay.{name}", message="no relay of that name"))
    digests = [key.digest for key in config.mailrelay.auth.keys]
    for i, digest in enumerate(digests):
        if digest in digests[:i]:
            # Two scopes for one secret: which applies would be an accident of order.
            problems.append(ConfigProblem(path=f"mailrelay.auth.keys[{i}]", message="the same key as an earlier entry"))
    names = [key.name for key in config.mailrelay.auth.keys]
    for i, name in enumerate(names):
        if name in names[:i]:
            problems.append(ConfigProblem(path=f"mailrelay.auth.keys[{i}].name", message=f"{name!r} is used twice"))
    return problems


def _custom_relay_problems(relays: dict[Any, Any], found: list[ConfigProblem]) -> list[ConfigProblem]:
    """`custom` relays: the factory imports (calling it waits for start-up) unless its path is
    already reported, and the options are plain YAML values (the factory gets them as they are)."""
    custom = {
        name: options
        for name, options in relays.items()
        if isinstance(options, dict) and options.get("type") == "custom"
    }
    reported = {problem.path for problem in found}
    problems = []
    for name, options in custom.items():
        path = f"relay.{name}.factory"
        if path in reported:
            continue
        try:
            import_factory(str(options.get("factory")))
        except ValueError as exc:
            problems.append(ConfigProblem(path=path, message=str(exc)))
            reported.add(path)
    for name, options in custom.items():
        try:
            json.dumps(options)
        except (TypeError, ValueError) as exc:
            problems.append(ConfigProblem(path=f"relay.{name}", message=f"options must be plain YAML values: {exc}"))
    return problems


def _ehlo_warnings(config: ServiceConfig, relays: dict[Any, Any]) -> list[ConfigProblem]:
    """EHLO names receiving servers refuse, also when it is this machine's FQDN, the default."""
    warnings = []
    for name, options in config.relay.items():
        ehlo = getattr(options, "ehlo_as", None)
        if ehlo and (warning := ehlo_warning(ehlo)):
            if "ehlo_as" not in relays[name]:
                warning = f"not set, so this machine's FQDN is used: {warning}"
            warnings.append(ConfigProblem(path=f"relay.{name}.ehlo_as", message=warning))
    return warnings


def _drop_unknown_keys(path: str, options: Any, warnings: list[ConfigProblem]) -> Any:
    """slimta ignored keys it did not know; we drop them too, but say so."""
    if not isinstance(options, dict):
        return options
    relay_type = options.get("type")
    model = OPTIONS_BY_TYPE.get(relay_type) if isinstance(relay_type, str) else None
    if model is None or model is CustomOptions:
        return options
    known = _known_keys(model)
    for key in options:
        if key not in known:
            warnings.append(
                ConfigProblem(
                    path=f"{path}.{key}",
                    message=f"unknown option for type {options['type']!r}; ignored",
                )
            )
    return {k: v for k, v in options.items() if k in known}


def _known_keys(model: type[BaseModel]) -> set[str]:
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        if isinstance(info.validation_alias, AliasChoices):
            keys.update(c for c in info.validation_alias.choices if isinstance(c, str))
        else:
            keys.add(info.alias or name)
    return keys


def _problem(error: ErrorDetails) -> ConfigProblem:
    loc = list(error["loc"])
    # pydantic puts the union tag in the path (relay.out.static.port); users never wrote it.
    if loc[:1] == ["relay"] and len(loc) >= 3 and loc[2] in OPTIONS_BY_TYPE:
        del loc[2]
    message = error["msg"].removeprefix("Value error, ")
    valid_types = ", ".join(sorted(OPTIONS_BY_TYPE))
    if error["type"] == "union_tag_invalid":
        loc.append("type")
        message = f"unknown relay type {error['ctx']['tag']!r}; valid types: {valid_types}"
    elif error["type"] == "union_tag_not_found":
        loc.append("type")
        message = f"missing; valid types: {valid_types}"
    elif error["type"] == "model_attributes_type" and loc[:1] == ["relay"] and len(loc) == 2:
        message = "must be a mapping of options with a `type`"
    elif error["type"] == "extra_forbidden":
        message = "unknown key; not an option here"
    elif loc and loc[-1] == "[key]":
        loc.pop()
        message = "relay names may use letters, digits and . _ ~ - (they appear in URLs), at most 128 characters"
    return ConfigProblem(path=format_path(loc), message=message)


class _Tagged:
    """A YAML value under a tag, such as slimta's `!include FILE`, kept for later.

    Tags are resolved only inside our own sections, so an `!include` in a
    section we ignore (slimta's `process:` logging) never has to exist.
    """

    def __init__(self, tag: str, value: Any, line: int) -> None:
        self.tag, self.value, self.line = tag, value, line

    def __str__(self) -> str:
        return f"{self.tag} {self.value}" if self.value is not None else self.tag


def _parse_yaml(text: str, source: str, warnings: list[ConfigProblem]) -> Any:
    """yaml.safe_load, keeping tagged values as _Tagged and warning on duplicate keys."""

    class Loader(yaml.SafeLoader):
        pass

    def tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> _Tagged:
        value = loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else None
        return _Tagged(node.tag, value, node.start_mark.line + 1)

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            # Plain scalar keys only; `<<` merge keys are YAML's, and their keys may be overridden.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value
            if key in seen:
                where = f"{source}, line {key_node.start_mark.line + 1}"
                warnings.append(ConfigProblem(path=key, message=f"duplicate key ({where}); the last one wins"))
            seen.add(key)
        return loader.construct_mapping(node, deep=True)

    Loader.add_multi_constructor("!", tagged)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError.at("", f"{source}: invalid YAML: {exc.problem or exc.context}{where}") from None
    except yaml.YAMLError as exc:
        raise ConfigError.at("", f"{source}: invalid YAML: {exc}") from None


def _resolve_tags(value: Any, path: str, base_dir: Path, warnings: list[ConfigProblem], depth: int = 0) -> Any:
    """Replace `!include FILE` (relative to the including file) by the file's content."""
    if isinstance(value, _Tagged):
        if value.tag != "!include" or not isinstance(value.value, str):
            raise ConfigError.at(
                path,
                f"YAML tag {value.tag} (line {value.line}) is not supported; only `!include FILE`",
            )
        if depth >= _MAX_INCLUDE_DEPTH:
            raise ConfigError.at(path, f"!include nested more than {_MAX_INCLUDE_DEPTH} deep")
        target = base_dir / value.value
        try:
            included = _parse_yaml(_read(target), str(target), warnings)
        except ConfigError as exc:
            raise ConfigError.at(path, f"!include {value.value}: {exc}") from None
        return _resolve_tags(included, path, target.parent, warnings, depth + 1)
    if isinstance(value, dict):
        return {
            k: _resolve_tags(v, f"{path}.{k}" if path else str(k), base_dir, warnings, depth) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_resolve_tags(v, f"{path}[{i}]", base_dir, warnings, depth) for i, v in enumerate(value)]
    return value
