"""Configuration loading: defaults, key-path errors, slimta compatibility."""

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.config import DEFAULT_SOURCE, load_config, parse_config
from schemas.config import ConfigError
from schemas.relay_options import OPTIONS_BY_TYPE, ehlo_warning, machine_fqdn, public_options

DATA = Path(__file__).parent / "data"
FQDN = machine_fqdn()
SMTP_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 30.0,
    "command_timeout": 30.0,
    "data_timeout": 60.0,
    "idle_timeout": 10.0,
    "concurrent_connections": 5,
    "max_waiting": 100,
    "ehlo_as": FQDN,
    "tls": None,
    "credentials": None,
    "ipv4_only": False,
    "dkim": [],
    "add_missing_headers": False,
    "auth_soft_bounce": True,
    "max_recipients_per_batch": 100,
    "chunking": True,
    "fleet_connections": False,
    "max_message_rate": None,
    "max_connection_rate": None,
    "max_rate_wait": 5.0,
}
#: mx encrypts by default: STARTTLS when offered, unverified (issue 18).
MX_TLS: dict[str, Any] = {
    "certfile": None,
    "keyfile": None,
    "ca_certs": None,
    "cert_reqs": None,
    "ciphers": None,
    "ssl_version": None,
    "server_side": None,
    "do_handshake_on_connect": None,
    "suppress_ragged_eofs": None,
    "mode": "opportunistic",
    "plaintext_fallback": False,
}
PROCESS_DEFAULTS: dict[str, Any] = {
    "timeout": 300.0,
    "concurrent_processes": 10,
    "cwd": None,
    "env": None,
    "user": None,
    "dkim": [],
    "add_missing_headers": False,
}

# (the relay's mapping in the file, every option GET /relays must show)
DEFAULTS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    (
        {"type": "mx"},
        {
            "type": "mx",
            **SMTP_DEFAULTS,
            "tls": MX_TLS,
            "mta_sts": True,
            "dane": False,
            "force_mx": {},
            "port": 25,
            "mx_address_limit": 5,
            "allow_internal_destinations": False,
        },
    ),
    (
        {"type": "static", "host": "smtp.example.com"},
        {"type": "static", **SMTP_DEFAULTS, "host": "smtp.example.com", "port": 25},
    ),
    ({"type": "lmtp"}, {"type": "lmtp", **SMTP_DEFAULTS, "host": "localhost", "port": 24}),
    (
        {"type": "pipe", "args": ["/bin/cat"]},
        {"type": "pipe", **PROCESS_DEFAULTS, "args": ["/bin/cat"], "error_pattern": None},
    ),
    ({"type": "maildrop"}, {"type": "maildrop", **PROCESS_DEFAULTS, "path": "maildrop", "extra_args": []}),
    ({"type": "dovecot"}, {"type": "dovecot", **PROCESS_DEFAULTS, "path": "dovecot-lda", "extra_args": []}),
    (
        {"type": "http", "url": "http://h.example:8025/"},
        {
            "type": "http",
            "url": "http://h.example:8025/",
            "ehlo_as": FQDN,
            "timeout": 60.0,
            "idle_timeout": None,
            "tls": None,
            "concurrent_connections": 100,
            "dkim": [],
            "add_missing_headers": False,
        },
    ),
    ({"type": "blackhole"}, {"type": "blackhole", "dkim": [], "add_missing_headers": False}),
    (
        {"type": "custom", "factory": "tests.scripted:factory"},
        {"type": "custom", "factory": "tests.scripted:factory", "dkim": [], "add_missing_headers": False},
    ),
]


def relay_config(options: dict[str, Any]) -> str:
    lines = ["relay:", "  r:"] + [
        f"    {k}: {v!r}" if isinstance(v, str) else f"    {k}: {v}" for k, v in options.items()
    ]
    return "\n".join(lines) + "\n"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "<test>")
    return [str(p) for p in info.value.problems]


def test_defaults_table_covers_every_type() -> None:
    assert {options["type"] for options, _ in DEFAULTS} == set(OPTIONS_BY_TYPE)


@pytest.mark.parametrize(("given", "expected"), DEFAULTS, ids=[d[0]["type"] for d in DEFAULTS])
def test_every_default_is_filled_in(given: dict[str, Any], expected: dict[str, Any]) -> None:
    loaded = parse_config(relay_config(given), "<test>")
    assert public_options(loaded.config.relay["r"]) == expected


def test_embedded_default_is_one_blackhole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILRELAY_CONFIG", raising=False)
    loaded = load_config(None)
    assert loaded.source == DEFAULT_SOURCE
    assert {n: o.type for n, o in loaded.config.relay.items()} == {"blackhole": "blackhole"}
    assert loaded.warnings == []
    assert loaded.config.mailrelay.max_recipients == 100
    assert loaded.config.mailrelay.max_message_size == 25 * 1024 * 1024


def test_config_path_from_environment(monkeypatch: pytest.MonkeyPatch, write_config: Callable[..., Path]) -> None:
    path = write_config("relay:\n  from_env: {type: blackhole}\n")
    monkeypatch.setenv("MAILRELAY_CONFIG", str(path))
    assert list(load_config(None).config.relay) == ["from_env"]
    other = write_config("relay:\n  explicit: {type: blackhole}\n", name="other.yaml")
    assert list(load_config(str(other)).config.relay) == ["explicit"]


def test_slimta_sample_loads_with_warnings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not checked until TLS is used\n")
    monkeypatch.setenv("MAILRELAY_TEST_DIR", str(tmp_path))
    loaded = load_config(str(DATA / "slimta.yaml"))
    relays = loaded.config.relay
    assert {n: o.type for n, o in relays.items()} == {
        "outbound": "mx",
        "smarthost": "static",
        "local": "lmtp",
        "archive": "pipe",
        "inbound": "maildrop",
        "dovecot": "dovecot",
        "chain": "http",
        "discard": "blackhole",
        "plugin": "custom",
    }
    warnings = {w.path: w.message for w in loaded.warnings}
    # slimta's own sections are ignored, and the !include inside one is never read.
    assert set(warnings) >= {"process", "edge", "queue"}
    assert all("not used by mailrelay" in warnings[s] for s in ("process", "edge", "queue"))
    # slimta's validator spelling `override_mx` lands in force_mx, domain lower-cased.
    outbound = public_options(relays["outbound"])
    assert outbound["force_mx"] == {"example.org": "smtp.example.org:2525"}
    assert outbound["concurrent_connections"] == 10
    smarthost = public_options(relays["smarthost"])
    assert smarthost["ehlo_as"] == FQDN  # {fqdn} filled in
    assert smarthost["tls"]["ca_certs"] == str(tmp_path / "ca.pem")  # $VARS expanded
    assert smarthost["credentials"] == {"username": "relay@example.com", "password": "***"}
    assert public_options(relays["plugin"])["api_key"] == "***"


def test_tls_paths_expand_home_and_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    for name in ("client.pem", "client.key"):
        (tmp_path / "certs" / name).write_text("x")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CERTS", str(tmp_path / "certs"))
    text = (
        relay_config({"type": "static", "host": "h"})
        + "    tls: {certfile: ~/certs/client.pem, keyfile: $CERTS/client.key}\n"
    )
    tls = public_options(parse_config(text, "<test>").config.relay["r"])["tls"]
    assert tls["certfile"] == str(tmp_path / "certs" / "client.pem")
    assert tls["keyfile"] == str(tmp_path / "certs" / "client.key")
    assert tls["mode"] == "starttls"
    assert tls["cert_reqs"] is None  # CERT_REQUIRED unless opportunistic


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "relay:\n  outbound: {type: static, host: h, port: abc}\n",
            ["relay.outbound.port: Input should be a valid integer"],
        ),
        ("relay:\n  outbound: {type: static}\n", ["relay.outbound.host: Field required"]),
        (
            "relay:\n  o: {type: static, host: h, port: 70000}\n",
            ["relay.o.port: Input should be less than or equal to 65535"],
        ),
        ("relay:\n  o: {type: mx, connect_timeout: 0}\n", ["relay.o.connect_timeout: Input should be greater than 0"]),
        (
            "relay:\n  o: {type: pipe, args: [/bin/x, '{rcpt}']}\n",
            ["relay.o.args[1]: unknown macro {rcpt} in '{rcpt}'"],
        ),
        ("relay:\n  o: {type: pipe, args: []}\n", ["relay.o.args: List should have at least 1 item"]),
        (
            "relay:\n  o: {type: pipe, args: [x], error_pattern: '('}\n",
            ["relay.o.error_pattern: not a valid regular expression"],
        ),
        ("relay:\n  o: {type: http, url: 'ftp://x/'}\n", ["relay.o.url: must be an absolute http:// or https:// URL"]),
        (
            "relay:\n  o: {type: mx, force_mx: {a.test: 'h:99999'}}\n",
            ["relay.o.force_mx.a.test: port '99999' is not a number"],
        ),
        ("relay:\n  o: {type: static, host: h, ehlo_as: '{domain}'}\n", ["relay.o.ehlo_as: unknown placeholder"]),
        (
            "relay:\n  o: {type: static, host: h, credentials: {username: u}}\n",
            ["relay.o.credentials.password: Field required"],
        ),
        ("relay:\n  o: {type: static, host: h, tls: {ca_cert: x}}\n", ["relay.o.tls.ca_cert: unknown key"]),
        (
            "relay:\n  o: {type: static, host: h, tls: {cert_reqs: 7}}\n",
            ["relay.o.tls.cert_reqs: Input should be 'CERT_NONE'"],
        ),
        (
            "relay:\n  o: {type: nope}\n",
            ["relay.o.type: unknown relay type 'nope'; valid types: blackhole, custom, dovecot"],
        ),
        ("relay:\n  o: {host: h}\n", ["relay.o.type: missing; valid types: blackhole"]),
        ("relay:\n  o: 5\n", ["relay.o: must be a mapping of options with a `type`"]),
        ("relay:\n  'a/b': {type: blackhole}\n", ["relay.a/b: relay names may use letters, digits and . _ ~ -"]),
        (
            "relay:\n  o: {type: blackhole}\nmailrelay: {max_recipients: 0}\n",
            ["mailrelay.max_recipients: Input should be greater"],
        ),
        ("relay:\n  o: {type: blackhole}\nmailrelay: {max_recipient: 5}\n", ["mailrelay.max_recipient: unknown key"]),
        ("relay:\n  o: {type: custom}\n", ["relay.o.factory: Field required"]),
        (
            "relay:\n  o: {type: blackhole}\n  p: {type: static, host: h, tls: !secret x}\n",
            ["relay.p.tls: YAML tag !secret"],
        ),
    ],
)
def test_errors_name_the_key_path(text: str, expected: list[str]) -> None:
    found = problems(text)
    assert len(found) == len(expected), found
    for got, want in zip(found, expected, strict=True):
        assert got.startswith(want), (got, want)


def test_all_problems_are_reported_at_once() -> None:
    text = """\
relay:
  a: {type: static, host: h, port: x}
  b: {type: nope}
  c: {type: pipe, args: ['{bad}']}
  d: {type: custom, factory: "no_such_module_here:make"}
"""
    assert [p.split(":")[0] for p in problems(text)] == [
        "relay.a.port",
        "relay.b.type",
        "relay.c.args[0]",
        "relay.d.factory",
    ]


def test_unknown_keys_are_dropped_with_a_warning() -> None:
    text = "relay:\n  o: {type: static, host: h, bogus: 1, pool_size: 3}\n  m: {type: mx, override_mx: {x.test: y}}\n"
    loaded = parse_config(text, "<test>")
    assert [(w.path, w.message) for w in loaded.warnings if "unknown" in w.message] == [
        ("relay.o.bogus", "unknown option for type 'static'; ignored"),
        ("relay.o.pool_size", "unknown option for type 'static'; ignored"),
    ]
    assert "bogus" not in public_options(loaded.config.relay["o"])
    assert not any(
        w.path.startswith("relay.m") and "unknown" in w.message for w in loaded.warnings
    )  # an alias is known


@pytest.mark.parametrize(
    ("ehlo", "warned"),
    [
        ("mail.example.com", False),
        ("localhost", True),
        ("localhost.localdomain", True),
        ("host.localdomain", True),
        ("[192.0.2.1]", True),
        ("192.0.2.1", True),
        ("[IPv6:2001:db8::1]", True),
    ],
)
def test_ehlo_as_that_servers_refuse_warns(ehlo: str, warned: bool) -> None:
    loaded = parse_config(f"relay:\n  o: {{type: static, host: h, ehlo_as: '{ehlo}'}}\n", "<test>")
    paths = [w.path for w in loaded.warnings]
    assert ("relay.o.ehlo_as" in paths) is warned


def test_ehlo_templates_are_filled() -> None:
    loaded = parse_config(
        "relay:\n  o: {type: http, url: 'http://x/', ehlo_as: 'relay.{hostname}.example'}\n", "<test>"
    )
    assert public_options(loaded.config.relay["o"])["ehlo_as"] == f"relay.{socket.gethostname()}.example"


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("tests.scripted", 'is not of the form "package.module:symbol"'),
        ("tests.no_such_module:factory", 'could not import module "tests.no_such_module": no such module'),
        ("tests.scripted:missing", 'symbol "missing" not found in module "tests.scripted"'),
        ("tests.scripted:NOT_CALLABLE", '"tests.scripted:NOT_CALLABLE" is not callable'),
    ],
)
def test_custom_factory_import_errors(factory: str, message: str) -> None:
    found = problems(f"relay:\n  plugin: {{type: custom, factory: '{factory}'}}\n")
    assert len(found) == 1
    assert found[0].startswith("relay.plugin.factory: ")
    assert message in found[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("relay: [\n", "invalid YAML"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("queue: {}\n", "relay: missing or empty"),
        ("relay:\n", "relay: missing or empty"),
        ("relay: {}\n", "relay: missing or empty"),
        ("relay: [a]\n", "relay: must be a mapping"),
    ],
)
def test_file_level_problems_are_one_line(text: str, message: str) -> None:
    found = problems(text)
    assert len(found) == 1
    assert message in found[0]
    assert "\n" not in found[0]


def test_unreadable_files(tmp_path: Path) -> None:
    for path, message in [(tmp_path / "missing.yaml", "no such file"), (tmp_path, "is a directory")]:
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
        assert str(info.value) == f"{path}: {message}" if message == "no such file" else message in str(info.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(binary))


def test_include_inside_relay_section(write_config: Callable[[str, str], Path]) -> None:
    write_config("type: static\nhost: included.example\n", "smarthost.yaml")
    path = write_config("relay:\n  smarthost: !include smarthost.yaml\n", "main.yaml")
    options = public_options(load_config(str(path)).config.relay["smarthost"])
    assert options["host"] == "included.example"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("relay:\n  x: {type: [a]}\n", "relay.x.type: unknown relay type \"['a']\""),
        ("relay:\n  x: {type: static, host: h, connect_timeout: true}\n", "relay.x.connect_timeout: must be a number"),
        (
            "relay:\n  x: {type: custom, factory: 'tests.scripted:factory', blob: !!binary /w==}\n",
            "relay.x: options must be",
        ),
        ("relay:\n  x: !include nofile.yaml\n", "relay.x: !include nofile.yaml: "),
    ],
)
def test_odd_values_are_problems_not_crashes(text: str, expected: str) -> None:
    (found,) = problems(text)
    assert found.startswith(expected), found


def test_yaml_merge_keys_work_as_in_slimta() -> None:
    text = "defaults: &smtp {host: h.example, port: 25}\nrelay:\n  x:\n    <<: *smtp\n    type: static\n    port: 26\n"
    loaded = parse_config(text, "<test>")
    assert public_options(loaded.config.relay["x"])["port"] == 26
    assert not any("duplicate" in w.message for w in loaded.warnings)


def test_warnings_come_with_errors() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("process: {}\n", "<test>")
    assert [w.path for w in info.value.warnings] == ["process"]


def test_secrets_are_masked_wherever_they_are() -> None:
    text = """\
relay:
  p: {type: pipe, args: [/bin/cat], env: {DB_PASSWORD: hunter2, PATH: /usr/bin}}
  h: {type: http, url: 'https://user:s3cr3t@relay.example/deliver'}
  c: {type: custom, factory: 'tests.scripted:factory', auth_header: 'Bearer abc', dsn: 'postgres://u:pw@h/db', note: 'x://a:b@c'}
"""
    relays = parse_config(text, "<test>").config.relay
    shown = {name: public_options(options) for name, options in relays.items()}
    assert shown["p"]["env"] == {"DB_PASSWORD": "***", "PATH": "***"}
    assert shown["h"]["url"] == "https://***@relay.example/deliver"  # the userinfo whole
    # A custom relay's options are masked unless its factory declares them public.
    assert (shown["c"]["auth_header"], shown["c"]["dsn"], shown["c"]["note"]) == ("***", "***", "***")
    for secret in ("hunter2", "s3cr3t", "Bearer abc", ":pw@", "user:"):
        assert secret not in str(shown)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # httpx splits the userinfo at the last "@": so does the mask.
        ("https://user:p@ss@word@relay.example/x", "https://***@relay.example/x"),
        ("https://token-only@relay.example/", "https://***@relay.example/"),
        ("https://relay.example/x?token=abc&empty=&flag", "https://relay.example/x?token=***&empty=***&***"),
        ("https://relay.example/a@b?", "https://relay.example/a@b?"),
        ("https://relay.example:8443/deliver", "https://relay.example:8443/deliver"),
    ],
)
def test_urls_lose_their_userinfo_and_query_values(url: str, shown: str) -> None:
    relays = parse_config(f"relay:\n  h: {{type: http, url: '{url}'}}\n", "<test>").config.relay
    assert public_options(relays["h"])["url"] == shown
    assert relays["h"].describe() == f"HTTP POST to {shown}"


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (
            ["--password=pw1", "--db-token", "t1", "-p", "pw2", "-ppw3"],
            ["--password=***", "--db-token", "***", "-p", "***", "-p***"],
        ),
        (
            ["--api-key=k", "--port", "25", "-P", "80", "--", "{recipient}"],
            ["--api-key=***", "--port", "25", "-P", "80", "--", "{recipient}"],
        ),
        (["--url=https://u:pw@h/x?sig=abc"], ["--url=https://***@h/x?sig=***"]),
    ],
)
def test_secret_looking_command_arguments_are_masked(args: list[str], shown: list[str]) -> None:
    text = f"relay:\n  p: {{type: pipe, args: {['/usr/bin/deliver', *args]!r}}}\n  m: {{type: maildrop, extra_args: {args!r}}}\n"
    relays = parse_config(text, "<test>").config.relay
    assert public_options(relays["p"])["args"] == ["/usr/bin/deliver", *shown]
    assert public_options(relays["m"])["extra_args"] == shown
    assert relays["p"].describe() == f"runs {' '.join(['/usr/bin/deliver', *shown])} per recipient"
    assert relays["m"].describe() == f"maildrop delivery with {' '.join(['maildrop', *shown])}"


def test_a_custom_factory_declares_which_options_are_public() -> None:
    text = (
        "relay:\n  c:\n    type: custom\n    factory: 'tests.attacks.test_limits:PluginRelay'\n"
        "    region: eu-west\n    key: k1\n    endpoint: null\n"
    )
    shown = public_options(parse_config(text, "<test>").config.relay["c"])
    assert shown == {
        "type": "custom",
        "factory": "tests.attacks.test_limits:PluginRelay",
        "region": "eu-west",
        "key": "***",
        "endpoint": None,
        "dkim": [],
        "add_missing_headers": False,
    }


def test_public_options_must_be_a_list_of_names() -> None:
    (found,) = problems("relay:\n  c: {type: custom, factory: 'tests.test_config:BadlyDeclared'}\n")
    assert found.startswith("relay.c.factory: ")
    assert "PUBLIC_OPTIONS must be a list of option names" in found


class BadlyDeclared:
    PUBLIC_OPTIONS = "region"  # a string, not a list of names


def test_dns_nameservers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILRELAY_DNS_NAMESERVERS", "127.0.0.1:5353, 192.0.2.53")
    settings = parse_config(
        "relay:\n  b: {type: blackhole}\nmailrelay: {dns_nameservers: [10.0.0.1]}\n", "<t>"
    ).config.mailrelay
    assert settings.nameservers() == [("127.0.0.1", 5353), ("192.0.2.53", 53)]


def test_every_step_reports_with_the_others_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # Environment, validation, custom factories, plain values: one error, and the warnings before it.
    monkeypatch.setenv("MAILRELAY_API_KEYS", "short")
    text = """\
queue: {}
relay:
  a: {type: static, host: h, port: x, pool_size: 3}
  d: {type: custom, factory: "no_such_module_here:make"}
  e: {type: custom, factory: 'tests.scripted:factory', blob: !!binary /w==}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "<test>")
    assert [p.path for p in info.value.problems] == [
        "$MAILRELAY_API_KEYS",
        "relay.a.port",
        "relay.d.factory",
        "relay.e",
    ]
    assert [(w.path, w.message) for w in info.value.warnings] == [
        ("queue", "section not used by mailrelay; ignored"),
        ("relay.a.pool_size", "unknown option for type 'static'; ignored"),
    ]


def test_a_factory_that_fails_validation_is_not_imported_too() -> None:
    assert problems("relay:\n  d: {type: custom, factory: 5}\n") == ["relay.d.factory: Input should be a valid string"]


def test_the_ehlo_warning_of_the_default_says_it_is_the_default() -> None:
    # The default is this machine's FQDN: the warning depends on the machine, its wording not.
    warnings = parse_config("relay:\n  o: {type: static, host: h}\n", "<test>").warnings
    expected = ehlo_warning(FQDN)
    assert [(w.path, w.message) for w in warnings] == (
        [("relay.o.ehlo_as", f"not set, so this machine's FQDN is used: {expected}")] if expected else []
    )


def test_plaintext_fallback_outside_opportunistic_mode_is_an_error_not_a_silent_no_op() -> None:
    text = "relay:\n  out: {type: static, host: h.example, tls: {mode: starttls, plaintext_fallback: true}}\n"
    (found,) = problems(text)
    assert found.startswith("relay.out.tls: ")
    assert "`plaintext_fallback` applies to mode `opportunistic` only" in found


def test_the_fleet_redis_url_is_checked_like_the_idempotency_stores() -> None:
    (found,) = problems(
        "mailrelay:\n  fleet: {redis_url: 'http://redis.example:6379'}\nrelay:\n  b: {type: blackhole}\n"
    )
    assert found.startswith("mailrelay.fleet: ")
    assert "must start with redis://" in found
