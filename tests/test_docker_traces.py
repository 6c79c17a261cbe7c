"""The trace pipeline of docker/compose.yaml: every service exports OTLP to the OpenTelemetry
Collector, which batches and forwards traces to Jaeger v2. Read as Docker Compose renders the
file (the helpers of tests/test_docker.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_docker import (
    COLLECTOR,
    DOCKER,
    JAEGER,
    JAEGER_OTLP_GRPC_PORT,
    collector_config,
    collector_otlp_ports,
    command,
    host_port,
    services,
)


@pytest.mark.parametrize("name", [COLLECTOR, JAEGER])
def test_trace_images_are_pinned_to_a_release(name) -> None:
    image = services()[name]["image"]
    repo, _, tag = image.rpartition(":")
    assert repo == {COLLECTOR: "otel/opentelemetry-collector-contrib",
                    JAEGER: "jaegertracing/jaeger"}[name]
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), f"{image}: pin a release, not {tag!r}"
    if name == JAEGER:
        assert tag.startswith("2."), "Jaeger v2 takes OTLP itself; v1 is end-of-life"


def test_collector_runs_the_config_file_in_the_repository() -> None:
    col = services()[COLLECTOR]
    (flag,) = [a for a in command(col) if a.startswith("--config")]
    path = flag.split("=", 1)[1]
    mounts = {v["target"]: v for v in col["volumes"]}
    assert path in mounts and mounts[path].get("read_only") is True
    assert Path(mounts[path]["source"]) == DOCKER / "otel-collector.yaml"


def test_collector_pipelines_receive_otlp_batch_and_export_traces_to_jaeger() -> None:
    cfg = collector_config()
    assert set(collector_otlp_ports()) == {"grpc", "http"}
    for kind in ("receivers", "processors", "exporters"):
        for pipeline, spec in cfg["service"]["pipelines"].items():
            for component in spec[kind]:
                assert component in cfg[kind], f"{pipeline} uses undefined {component}"
    for ext in cfg["service"].get("extensions", []):
        assert ext in cfg["extensions"], ext
    traces = cfg["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"] and "batch" in traces["processors"]
    # The services export metrics too: a pipeline must take them, or every export is refused.
    assert "metrics" in cfg["service"]["pipelines"]
    (exporter,) = traces["exporters"]
    assert exporter.split("/")[0] == "otlp", "Jaeger v2 takes OTLP"
    host, port = host_port(cfg["exporters"][exporter]["endpoint"])
    assert host == JAEGER and port == JAEGER_OTLP_GRPC_PORT
    assert cfg["exporters"][exporter]["tls"]["insecure"] is True  # plaintext inside the stack
    assert services()[COLLECTOR]["depends_on"][JAEGER]["condition"] == "service_started"


def test_jaeger_takes_otlp_from_the_other_containers() -> None:
    # Jaeger v2's built-in configuration binds to JAEGER_LISTEN_HOST (localhost outside its
    # image): the collector in another container needs 0.0.0.0.
    assert services()[JAEGER]["environment"]["JAEGER_LISTEN_HOST"] == "0.0.0.0"
