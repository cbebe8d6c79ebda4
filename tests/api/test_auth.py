"""API keys: 401 without a valid one, 403 outside its scope, and keys never kept or shown in plaintext."""

import argparse
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest
from fastapi.testclient import TestClient

from app.cli import _exposure_allowed, is_loopback, main
from app.config import LoadedConfig, parse_config
from schemas.config import ConfigError
from tests.conftest import config_from, post_delivery

OPS_KEY = "ops-key-0123456789abcdef"
BILLING_KEY = "billing-key-0123456789abcdef"


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYED_YAML = f"""\
relay:
  outbound:
    type: blackhole
  billing:
    type: blackhole
  internal:
    type: blackhole
mailrelay:
  auth:
    keys:
      - name: ops
        sha256: {sha256(OPS_KEY)}
      - name: billing-app
        sha256: {sha256(BILLING_KEY).upper()}
        relays: [billing]
"""


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(make_client: Callable[[str], TestClient]) -> TestClient:
    return make_client(KEYED_YAML)


def deliver(client: TestClient, relay: str, headers: dict[str, str] | None = None) -> httpx2.Response:
    return client.post(
        f"/relays/{relay}/deliver",
        json={"sender": "a@example.com", "recipients": ["b@example.net"], "message": "Subject: x\r\n\r\nhi\r\n"},
        headers=headers or {},
    )


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, None),
        (bearer("not-a-valid-key-at-all"), "invalid_token"),
        ({"Authorization": f"Basic {OPS_KEY}"}, "invalid_request"),
        ({"Authorization": "Bearer "}, "invalid_request"),
        (bearer(OPS_KEY + "x"), "invalid_token"),
    ],
)
def test_a_missing_or_invalid_key_is_401_with_a_bearer_challenge(
    keyed: TestClient, headers: dict[str, str], error: str | None
) -> None:
    for response in (
        keyed.get("/relays", headers=headers),
        keyed.get("/relays/outbound", headers=headers),
        deliver(keyed, "outbound", headers),
    ):
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="mailrelay"')
        assert (f'error="{error}"' in challenge) if error else ("error=" not in challenge)


def test_a_valid_key_delivers_and_sees_every_relay(keyed: TestClient) -> None:
    response = deliver(keyed, "outbound", bearer(OPS_KEY))
    assert response.status_code == 200
    listed = keyed.get("/relays", headers=bearer(OPS_KEY)).json()
    assert [r["name"] for r in listed["relays"]] == ["outbound", "billing", "internal"]
    assert keyed.get("/relays/nope", headers=bearer(OPS_KEY)).status_code == 404


def test_a_scoped_key_gets_403_outside_its_relays_and_sees_only_its_own(keyed: TestClient) -> None:
    assert deliver(keyed, "billing", bearer(BILLING_KEY)).status_code == 200
    refused = deliver(keyed, "outbound", bearer(BILLING_KEY))
    assert refused.status_code == 403
    assert "billing-app" in refused.json()["detail"]
    # An unknown name is 403 too: a scoped key cannot probe which relays exist.
    assert deliver(keyed, "nope", bearer(BILLING_KEY)).status_code == 403
    assert keyed.get("/relays/internal", headers=bearer(BILLING_KEY)).status_code == 403
    listed = keyed.get("/relays", headers=bearer(BILLING_KEY)).json()
    assert [r["name"] for r in listed["relays"]] == ["billing"]


def test_health_endpoints_and_the_document_stay_open(keyed: TestClient) -> None:
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/readyz").status_code == 200
    assert keyed.get("/openapi.json").status_code == 200


def test_without_keys_the_service_is_open(client: TestClient) -> None:
    assert post_delivery(client, "blackhole", ["b@example.net"]).status_code == 200


def test_keys_from_the_environment_variable_allow_every_relay(
    monkeypatch: pytest.MonkeyPatch, make_client: Callable[[str], TestClient]
) -> None:
    monkeypatch.setenv("MAILRELAY_API_KEYS", f" {OPS_KEY} , {BILLING_KEY}")
    client = make_client("relay:\n  a: {type: blackhole}\n  b: {type: blackhole}\n")
    assert deliver(client, "a", bearer(BILLING_KEY)).status_code == 200
    assert deliver(client, "b", bearer(OPS_KEY)).status_code == 200
    assert deliver(client, "b").status_code == 401


def test_keys_from_an_env_variable_or_a_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, make_client: Callable[[str], TestClient]
) -> None:
    monkeypatch.setenv("BILLING_KEY", BILLING_KEY)
    secret = tmp_path / "ops.key"
    secret.write_text(OPS_KEY + "\n", encoding="utf-8")
    client = make_client(
        f"""\
relay:
  a: {{type: blackhole}}
mailrelay:
  auth:
    keys:
      - {{name: from-env, env: BILLING_KEY}}
      - {{name: from-file, file: {secret}}}
"""
    )
    assert deliver(client, "a", bearer(BILLING_KEY)).status_code == 200
    assert deliver(client, "a", bearer(OPS_KEY)).status_code == 200


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from(text)
    return [str(p) for p in caught.value.problems]


def test_key_configuration_problems_name_their_key_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHORT_KEY", "short")
    monkeypatch.delenv("UNSET_KEY", raising=False)
    problems = problems_of(
        """\
relay:
  a: {{type: blackhole}}
mailrelay:
  auth:
    keys:
      - {{name: plain, key: my-plaintext-key-0123456789}}
      - {{name: unset, env: UNSET_KEY}}
      - {{name: short, env: SHORT_KEY}}
      - {{name: digest, sha256: abc}}
      - {{name: two, sha256: "{}", env: SHORT_KEY}}
      - {{name: scoped, sha256: "{}", relays: [a, typo]}}
      - {{name: missing-file, file: /nonexistent/key}}
""".format("a" * 64, "b" * 64)
    )
    joined = "\n".join(problems)
    assert "mailrelay.auth.keys[0]: a plaintext `key` is not accepted" in joined
    assert "mailrelay.auth.keys[1]: `env`: the environment variable UNSET_KEY is not set or empty" in joined
    assert "mailrelay.auth.keys[2]: the key in the environment variable SHORT_KEY is shorter than 16" in joined
    assert "mailrelay.auth.keys[3]: `sha256` must be 64 hexadecimal digits" in joined
    assert "mailrelay.auth.keys[4]: give exactly one of" in joined
    assert "mailrelay.auth.keys[6]: `file`: cannot read /nonexistent/key" in joined
    # No secret is repeated back.
    assert "my-plaintext-key" not in joined
    assert "short\n" not in joined + "\n"


def test_a_scope_naming_an_unknown_relay_is_a_config_error() -> None:
    problems = problems_of(
        f"""\
relay:
  a: {{type: blackhole}}
mailrelay:
  auth:
    keys:
      - {{name: k, sha256: "{"a" * 64}", relays: [a, typo]}}
      - {{name: k, sha256: "{"b" * 64}"}}
"""
    )
    assert problems == [
        "mailrelay.auth.keys[0].relays[1]: no relay named 'typo'",
        "mailrelay.auth.keys[1].name: 'k' is used twice",
    ]


def test_a_short_key_in_the_environment_variable_is_refused_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAILRELAY_API_KEYS", f"{OPS_KEY},tiny-secret")
    problems = problems_of("relay:\n  a: {type: blackhole}\n")
    assert problems == ["$MAILRELAY_API_KEYS: the key in $MAILRELAY_API_KEYS (key 2) is shorter than 16 characters"]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),  # noqa: S104
        ("::", False),
        ("192.0.2.1", False),
        ("mail.example.com", False),
        ("", False),
    ],
)
def test_only_loopback_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_serve_refuses_a_public_address_without_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 1  # noqa: S104 - refused before binding
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 with no API key configured" in err
    assert "--insecure-allow-unauthenticated" in err


def test_the_insecure_override_is_allowed_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    loaded = LoadedConfig(config=parse_config("relay:\n  a: {type: blackhole}\n", "<t>").config, source="<t>")
    args = argparse.Namespace(host="0.0.0.0", insecure_allow_unauthenticated=True)  # noqa: S104
    with caplog.at_level(logging.WARNING, logger="mailrelay"):
        assert _exposure_allowed(loaded, args)
    assert "INSECURE" in caplog.text
    setting = parse_config(
        "relay:\n  a: {type: blackhole}\nmailrelay:\n  auth: {insecure_allow_unauthenticated: true}\n", "<t>"
    )
    args.insecure_allow_unauthenticated = False
    assert _exposure_allowed(LoadedConfig(config=setting.config, source="<t>"), args)
    keyed = parse_config(
        f"relay:\n  a: {{type: blackhole}}\nmailrelay:\n  auth:\n    keys: [{{name: k, sha256: '{'a' * 64}'}}]\n", "<t>"
    )
    assert _exposure_allowed(LoadedConfig(config=keyed.config, source="<t>"), args)


def test_one_secret_in_two_entries_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Otherwise a scoped entry and an unscoped one would share a key, and order would decide.
    monkeypatch.setenv("MAILRELAY_API_KEYS", BILLING_KEY)
    problems = problems_of(
        f"relay:\n  a: {{type: blackhole}}\nmailrelay:\n  auth:\n"
        f"    keys: [{{name: scoped, sha256: '{sha256(BILLING_KEY)}', relays: [a]}}]\n"
    )
    assert problems == ["mailrelay.auth.keys[1]: the same key as an earlier entry"]
