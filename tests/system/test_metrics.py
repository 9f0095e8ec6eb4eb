"""Prometheus metrics of a real chain: the edge's and every node's series agree with what the run did, names
follow Prometheus' rules (checked by ``promtool`` too where it is installed), the Grafana dashboard asks only
for series and labels that exist, and a page served beyond loopback needs a cluster certificate."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from torch.utils.data import TensorDataset

from splitexit.config import ClusterSpec
from splitexit.control.edge import Entry, RunResult
from splitexit.runtime.metrics_server import SOCKET_TIMEOUT
from splitexit.runtime.security import init_ca, issue_certificate
from splitexit.wire.framing import FrameType
from support import data_connection, digits_net, free_port, start_nodes, stop_nodes

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "splitexit.json"
INPUTS = 60
#: Grafana's variables, as a scrape-free check reads them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$edge": ".*", "$node": ".*"}


@dataclass
class Scraped:
    pages: dict[str, str]  # member -> its /metrics page
    result: RunResult

    def samples(self, member: str) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(self.pages[member])
                for s in family.samples]

    def value(self, member: str, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples on ``member``'s page whose labels include ``labels``."""
        return sum(v for n, ls, v in self.samples(member) if n == name and labels.items() <= ls.items())


def cluster_spec(**security: object) -> ClusterSpec:
    metrics = {"metrics": {"address": "127.0.0.1:0"}}
    return ClusterSpec.model_validate({
        "nodes": [{"name": "edge", "role": "edge", **metrics},
                  {"name": "cloud1", "address": f"127.0.0.1:{free_port()}", **metrics},
                  {"name": "cloud2", "address": f"127.0.0.1:{free_port()}", **metrics}],
        "batching": {"max_batch": 8, "max_wait": "2ms"}, "window": 8, **security})


def scrape(url: str, context: ssl.SSLContext | None = None, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:
        return str(reply.read().decode())


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Scraped:
    """A run of 60 inputs through edge -> cloud1 -> cloud2, one malformed connection to cloud1, then every
    member's page."""
    net = digits_net()
    cluster = cluster_spec()
    inputs = TensorDataset(torch.randn(INPUTS, 1, 8, 8, generator=torch.Generator().manual_seed(3)),
                           torch.zeros(INPUTS, dtype=torch.long))

    async def go() -> Scraped:
        nodes = await start_nodes(cluster, tmp_path_factory.mktemp("cache"))
        entry = Entry(net, cluster)
        try:
            await entry.start()
            result = await entry.run(inputs)
            connection, _ = await data_connection(nodes[0].address, None, hello=False)
            await connection.send(FrameType.RESULTS, b"")  # not a HELLO: refused as bad_message
            await connection.close()
            await asyncio.sleep(0.2)
            assert entry.metrics_server is not None
            servers = {"edge": entry.metrics_server, **{n.name: n.metrics_server for n in nodes}}
            pages = {name: await asyncio.to_thread(scrape, server.url)
                     for name, server in servers.items() if server is not None}
            return Scraped(pages, result)
        finally:
            await entry.close()
            await stop_nodes(nodes)

    return asyncio.run(go())


# --------------------------------------------------------------------------- what the series say
def test_the_edge_counts_every_request_and_its_latency(scraped: Scraped) -> None:
    assert scraped.value("edge", "splitexit_requests_total", outcome="answered") == INPUTS
    assert scraped.value("edge", "splitexit_latency_seconds_count") == INPUTS
    assert 0 < scraped.value("edge", "splitexit_latency_seconds_sum") < INPUTS * 30
    assert scraped.value("edge", "splitexit_in_flight_rows") == 0
    assert scraped.value("edge", "splitexit_plan_changes_total", cause="start") == 1


def test_rows_and_exits_add_up_along_the_chain(scraped: Scraped) -> None:
    exits = {member: scraped.value(member, "splitexit_exits_total") for member in ("edge", "cloud1", "cloud2")}
    assert sum(exits.values()) == INPUTS, exits  # every request left by exactly one exit, somewhere
    assert all(exits.values()), f"digits_net at the 0.6 quantile answers some rows at every tier: {exits}"
    answered = {r.node: 0 for r in scraped.result.records}
    for record in scraped.result.records:
        answered[record.node] += 1
    assert {m: int(n) for m, n in exits.items()} == answered, "the exits counted where the records say"
    went_on = INPUTS
    for upper, lower in (("edge", "cloud1"), ("cloud1", "cloud2")):
        went_on -= int(exits[upper])
        assert scraped.value(upper, "splitexit_rows_total", outcome="forwarded") == went_on, upper
        assert scraped.value(lower, "splitexit_batch_rows_sum") == went_on, f"{lower} computed what {upper} sent on"
    assert scraped.value("cloud2", "splitexit_rows_total", outcome="forwarded") == 0
    assert scraped.value("edge", "splitexit_batch_rows_sum") == INPUTS


def test_link_bytes_are_the_run_results(scraped: Scraped) -> None:
    for link, counters in scraped.result.links.items():
        sender, target = link.split("->")
        assert scraped.value(sender, "splitexit_link_raw_bytes_total", target=target) == counters.raw_bytes > 0
        assert scraped.value(sender, "splitexit_link_wire_bytes_total", target=target) == counters.wire_bytes
        assert scraped.value(sender, "splitexit_link_messages_total", target=target) == counters.messages


def test_plans_and_stage_shipments_are_reported_on_both_ends(scraped: Scraped) -> None:
    version = str(scraped.result.placement.version)
    for member in ("edge", "cloud1", "cloud2"):
        assert scraped.value(member, "splitexit_plan_info", plan=version) == 1, member
    shipped: dict[str, int] = {}
    for node, _, size in scraped.result.stage_shipments:
        shipped[node] = shipped.get(node, 0) + size
    for node, size in shipped.items():
        assert scraped.value("edge", "splitexit_stage_shipped_bytes_total", target=node) == size
        assert scraped.value(node, "splitexit_stage_received_bytes_total") == size
        assert scraped.value(node, "splitexit_plans_assigned_total") == 1
    assert scraped.value("cloud1", "splitexit_node_info", role="worker", tier="1") == 1
    assert scraped.value("edge", "splitexit_node_info", role="edge", tier="0") == 1


def test_a_malformed_connection_is_counted_by_reason(scraped: Scraped) -> None:
    assert scraped.value("cloud1", "splitexit_refusals_total", reason="bad_message") == 1
    assert scraped.value("cloud2", "splitexit_refusals_total") == 0


# --------------------------------------------------------------------------- names
def families(page: str) -> Iterator[tuple[str, str, str, list[str]]]:
    """(name, type, help, label names) of every family on a page."""
    for family in text_string_to_metric_families(page):
        labels = sorted({label for sample in family.samples for label in sample.labels})
        yield family.name, family.type, family.documentation, labels


def test_names_follow_the_prometheus_conventions(scraped: Scraped) -> None:
    """What `promtool check metrics` checks, and our own rules: one prefix, base units, `_total` counters."""
    units = ("_seconds", "_bytes", "_rows")
    seen: dict[str, tuple[str, list[str]]] = {}
    for member, page in scraped.pages.items():
        for name, kind, help_, labels in families(page):
            assert re.fullmatch(r"splitexit_[a-z][a-z0-9_]*", name), name
            assert help_.strip(), f"{name} has no HELP"
            assert "node" in labels or not labels, f"{name} does not say which member it is from"  # none: no
            # sample yet (a labelled series appears with its first event)
            assert all(re.fullmatch(r"[a-z][a-z0-9_]*", label) for label in labels), (name, labels)
            assert not re.search(r"_(ms|milliseconds|kb|mb|kib|mib|bits|percent)(_|$)", name), f"{name}: base units"
            if kind == "counter":
                assert f"{name}_total" in page, f"counter {name} is not exposed as {name}_total"
            else:
                assert not name.endswith("_total"), f"{kind} {name} ends in _total"
            if kind == "histogram":
                assert name.endswith(units), f"histogram {name} names no unit"
            if "bytes" in name:
                assert name.endswith("_bytes"), f"{name}: bytes go last, as the unit"
            if kind == "gauge" and name.endswith("_info"):
                assert all(v == 1 for n, _, v in scraped.samples(member) if n == name), name
            if name in seen:
                assert seen[name][0] == kind, f"{name} is a {seen[name][0]} on one member, a {kind} on another"
            seen[name] = (kind, labels)
    for series in ("requests", "rows", "exits", "latency_seconds", "stage_compute_seconds", "batch_rows",
                   "link_raw_bytes", "link_wire_bytes", "queue_depth", "in_flight_rows", "plan_info",
                   "plan_changes", "refusals", "stage_shipped_bytes", "stage_received_bytes", "node_info"):
        assert f"splitexit_{series}" in seen, f"splitexit_{series} is missing"


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian: apt-get install prometheus); "
                           "test_names_follow_the_prometheus_conventions checks the same rules")
def test_promtool_finds_nothing_wrong(scraped: Scraped) -> None:
    for member, page in scraped.pages.items():
        checked = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True, text=True,
                                 timeout=60)
        assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), \
            f"{member}: {checked.stdout}{checked.stderr}"


# --------------------------------------------------------------------------- the dashboard
def dashboard_queries() -> list[str]:
    document = json.loads(DASHBOARD.read_text())
    queries: list[str] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            queries.extend(target["expr"] for target in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(document["panels"])
    for variable in document["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    assert len(queries) > 15
    return queries


def test_every_dashboard_query_names_existing_series_and_labels(scraped: Scraped) -> None:
    exposed: dict[str, set[str]] = {}
    for member in scraped.pages:
        for name, labels, _ in scraped.samples(member):
            exposed.setdefault(name, set()).update(labels)
    for query in dashboard_queries():
        names = set(re.findall(r"\bsplitexit_[a-z0-9_]+", query))
        assert names, f"no splitexit series in {query!r}"
        for name in names:
            assert name in exposed, f"{name} in {query!r} is on no member's page (exposed: {sorted(exposed)})"
        labels = set(re.findall(r"\b([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"", query))  # matchers
        for group in re.findall(r"\b(?:by|on|group_left|without)\s*\(([^)]*)\)", query):
            labels.update(part.strip() for part in group.split(",") if part.strip())
        known = set().union(*(exposed[name] for name in names))
        missing = labels - known - {"le"} if any(n.endswith("_bucket") for n in names) else labels - known
        assert not missing, f"{query!r} uses labels {sorted(missing)} that none of {sorted(names)} carries"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed: no PromQL parser here")
def test_every_dashboard_query_parses_as_promql(tmp_path: Path) -> None:
    """`promtool check rules` parses each query as a recording rule (Grafana's variables filled in)."""
    rules = []
    for index, query in enumerate(dashboard_queries()):
        if query.startswith("label_values("):  # Grafana's own function: its argument is the PromQL
            query = query[len("label_values("):].rpartition(",")[0]
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        rules.append({"record": f"splitexit:dashboard_query_{index}", "expr": query})
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --------------------------------------------------------------------------- beyond loopback
def test_metrics_beyond_loopback_are_refused_without_tls() -> None:
    with pytest.raises(ValidationError, match="beyond loopback.*security: {tls: DIR}"):
        ClusterSpec.model_validate({"nodes": [{"name": "edge", "role": "edge"},
                                              {"name": "cloud1", "address": "127.0.0.1:50061",
                                               "metrics": {"address": "0.0.0.0:9100"}}]})


def test_metrics_beyond_loopback_need_a_cluster_certificate(tmp_path: Path) -> None:
    """0.0.0.0 with TLS: HTTPS, readable with a certificate of the cluster CA only; plain HTTP, no certificate
    or another CA's get nothing, and a client that connects and says nothing holds up no scrape."""
    pki, intruder = tmp_path / "pki", tmp_path / "intruder"
    init_ca(pki)
    init_ca(intruder)
    for name in ("cloud1", "prometheus"):
        issue_certificate(pki, name)
    issue_certificate(intruder, "prometheus")
    port = free_port()
    cluster = ClusterSpec.model_validate({
        "nodes": [{"name": "edge", "role": "edge"},
                  {"name": "cloud1", "address": f"127.0.0.1:{free_port()}",
                   "metrics": {"address": f"0.0.0.0:{port}"}}],
        "security": {"tls": str(pki)}})

    def client(directory: Path | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.check_hostname = False  # the node's certificate names cloud1, the URL 127.0.0.1
        if directory is not None:
            context.load_cert_chain(directory / "prometheus.pem", directory / "prometheus.key")
        return context

    async def go() -> None:
        (node,) = await start_nodes(cluster, tmp_path / "cache")
        silent = socket.create_connection(("127.0.0.1", port))  # never says a word
        try:
            url = f"https://127.0.0.1:{port}/metrics"
            # a server that waited for the silent client's handshake would answer only after dropping it (5 s)
            page = await asyncio.to_thread(scrape, url, client(pki), SOCKET_TIMEOUT - 1)
            assert 'splitexit_node_info{node="cloud1"' in page
            for refused in (client(None), client(intruder)):
                with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                    await asyncio.to_thread(scrape, url, refused)
            with pytest.raises((urllib.error.URLError, ConnectionError, http_errors())):
                await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
        finally:
            silent.close()
            await stop_nodes([node])

    asyncio.run(go())


def http_errors() -> type[Exception]:
    import http.client

    return http.client.HTTPException
