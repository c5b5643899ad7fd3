"""The container and Kubernetes files agree with the code they run.

Schema validity is kubernetes-validate's job (run here too, so a failure shows its output);
hadolint runs in `make lint-deploy`. These tests check what no schema knows: every flag the
manifests pass exists and the settings they add up to are accepted by `kiln serve` and
`kiln gateway`, the probes reach the port the server really answers health on, the grace
period outlasts the drain, the Dockerfile's ports match the manifests, and the autoscaler's
metric exists all the way from the HPA to the adapter rule to the server's registry.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln_build.cli import register as register_build_engines
from kiln_gateway.app import upstream_connection
from kiln_gateway.cli import register as register_gateway
from kiln_gateway.settings import load_settings as load_gateway_settings
from kiln_server.cli import register as register_serve
from kiln_server.metrics import OUTCOMES, ServerMetrics
from kiln_server.models.registry import ModelRegistry
from kiln_server.settings import ServerSettings, read_config_file
from kiln_server.settings import load_settings as load_server_settings
from kiln_server.tokens import GENERATE

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "Dockerfile"
# `kiln serve` stops the gRPC server with this grace after the drain (server.py).
SERVER_STOP_GRACE_SECONDS = 5.0
# Real SDXL engines take minutes to load and warm up.
MIN_STARTUP_SECONDS = 600


def manifest_files() -> list[Path]:
    """Every Kubernetes object file: all YAML but kustomize's and the adapter's Helm values."""
    return sorted(
        path
        for path in DEPLOY.rglob("*.yaml")
        if path.name != "kustomization.yaml" and "prometheus-adapter" not in path.parts
    )


def objects() -> list[dict[str, Any]]:
    found = []
    for path in manifest_files():
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                document["_file"] = path.relative_to(DEPLOY).as_posix()
                found.append(document)
    return found


def one(kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1
    return containers[0]


def workloads() -> list[dict[str, Any]]:
    return [o for o in objects() if o["kind"] in ("Deployment", "Job")]


PARSERS = {
    "serve": register_serve,
    "gateway": register_gateway,
    "build-engines": register_build_engines,
}


def parse_command(spec: dict[str, Any]) -> tuple[str, argparse.Namespace]:
    """Parse a container's `kiln SUBCOMMAND ARGS` with the real argparse parser."""
    argv = [*spec.get("command", []), *spec.get("args", [])]
    assert argv[:1] == ["kiln"] and argv[1] in PARSERS, f"not a kiln command: {argv}"
    parser = argparse.ArgumentParser(prog="kiln", exit_on_error=False)
    subparsers = parser.add_subparsers(dest="command", required=True)
    PARSERS[argv[1]](subparsers)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = parser.parse_args(argv[1:])
    except (SystemExit, argparse.ArgumentError) as error:
        pytest.fail(
            f"`{shlex.join(argv)}` is refused by the `kiln {argv[1]}` parser: "
            f"{errors.getvalue().strip() or error}"
        )
    return argv[1], args


def flags_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("handler", "command")}


def example_secrets() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / "secrets.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def environment(spec: dict[str, Any]) -> dict[str, str]:
    """The container's environment, secrets taken from secrets.env.example."""
    secrets = example_secrets()
    env = {}
    for variable in spec.get("env", []):
        if "value" in variable:
            env[variable["name"]] = str(variable["value"])
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "kiln-secrets", variable
            env[variable["name"]] = secrets[ref["key"]]
    return env


def local_path(spec: dict[str, Any], path: Path) -> Path:
    """Map a path in the container to the repository file a ConfigMap mounts there."""
    for mount in spec.get("volumeMounts", []):
        if Path(mount["mountPath"]) == path and mount.get("subPath") == "kiln.toml":
            return DEPLOY / "kiln.toml"
    return path


def server() -> dict[str, Any]:
    return one("Deployment", "kiln-server")


def server_args() -> argparse.Namespace:
    _, args = parse_command(container(server()))
    return args


def grpc_probes(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        kind: spec[kind]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        if kind in spec
    }


def port_named(spec: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in spec.get("ports", [])}
    assert name in ports, f"container {spec['name']} declares no port named {name!r}: {ports}"
    return int(ports[name])


# ---- schemas -----------------------------------------------------------------------------


def test_manifests_pass_the_kubernetes_schemas() -> None:
    makefile = (REPO / "Makefile").read_text()
    version = re.search(r"^K8S_VERSION := (\S+)", makefile, re.M)
    assert version, "the Makefile names the Kubernetes version to validate against"
    tool = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run(
        [str(tool), "--strict", "--quiet", "-k", version[1], *map(str, manifest_files())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"kubernetes-validate:\n{result.stdout}{result.stderr}"


def test_kustomization_lists_every_manifest_and_generator_file() -> None:
    kust = kustomization()
    listed = set(kust["resources"])
    top_level = {p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == top_level, "kustomization.yaml resources differ from the files beside it"
    for generator in kust["configMapGenerator"]:
        for file in generator["files"]:
            assert (DEPLOY / file).is_file(), file
    # The secret comes from a file the user creates (never a committed placeholder): its
    # template exists, the real one is git-ignored, and every key the pods read is in it.
    (secret,) = kust["secretGenerator"]
    assert secret["envs"] == ["secrets.env"]
    assert "secrets.env" in (DEPLOY / ".gitignore").read_text().split()
    keys = set(example_secrets())
    for workload in workloads():
        for variable in container(workload).get("env", []):
            ref = variable.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["name"] and ref["key"] in keys, variable


def test_build_engines_job_runs_the_image_the_kustomization_deploys() -> None:
    (image,) = kustomization()["images"]
    job = one("Job", "kiln-build-engines")
    assert container(job)["image"] == f"{image['newName']}:{image['newTag']}"
    for deployment in (server(), one("Deployment", "kiln-gateway")):
        assert container(deployment)["image"] == image["name"]


# ---- flags and settings --------------------------------------------------------------------


def test_every_kiln_command_in_the_manifests_parses() -> None:
    commands = {parse_command(container(w))[0] for w in workloads()}
    assert commands == {"serve", "gateway", "build-engines"}


def test_server_settings_are_accepted_by_kiln_serve() -> None:
    spec = container(server())
    args = server_args()
    flags = flags_of(args)
    flags["config"] = local_path(spec, args.config)
    settings, config = load_server_settings(flags, environment(spec))
    assert settings.host == "0.0.0.0"
    registry = ModelRegistry.from_config(config, Path("/nonexistent"))
    mounts = [Path(m["mountPath"]) for m in spec["volumeMounts"]]
    for model in registry.models.values():
        assert any(mount in model.path.parents for mount in mounts), (
            f"model {model.name} at {model.path} is on no mounted volume"
        )


def test_gateway_settings_and_upstream_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = container(one("Deployment", "kiln-gateway"))
    _, args = parse_command(spec)
    env = environment(spec)
    settings = load_gateway_settings(flags_of(args), env)
    assert settings.auth_enabled
    monkeypatch.setenv("KILN_API_TOKEN", env["KILN_API_TOKEN"])
    connection = upstream_connection(settings)
    assert connection.token == env["KILN_API_TOKEN"]
    # The upstream is the headless Service (client-side round_robin over every pod).
    headless = one("Service", "kiln-server-headless")
    assert headless["spec"]["clusterIP"] == "None"
    (port,) = headless["spec"]["ports"]
    assert settings.upstream == f"dns:///{headless['metadata']['name']}:{port['port']}"
    # ... and the servers accept the token the gateway sends them.
    server_settings, _ = load_server_settings(
        {"host": "0.0.0.0", "allow_plaintext_tokens": True}, environment(container(server()))
    )
    assert any(
        t.secret == env["KILN_API_TOKEN"] and t.allows(GENERATE) for t in server_settings.api_tokens
    ), "gateway-upstream-token is not a server token with the generate scope"


def test_no_service_links_in_kiln_pods() -> None:
    # Service links would add variables such as KILN_GATEWAY_PORT=tcp://10.0.0.1:80 (from the
    # Service kiln-gateway), which the gateway reads as its port setting.
    for workload in workloads():
        assert pod_spec(workload).get("enableServiceLinks") is False, workload["_file"]


# ---- probes, ports, shutdown ----------------------------------------------------------------


def test_probes_use_grpc_health_on_the_plaintext_health_port() -> None:
    spec = container(server())
    args = server_args()
    assert args.health_port is not None, "the server must serve health on --health-port"
    assert port_named(spec, "health") == args.health_port
    probes = grpc_probes(spec)
    assert set(probes) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for kind, probe in probes.items():
        assert "grpc" in probe, f"{kind} is not a native gRPC probe"
        assert probe["grpc"]["port"] == args.health_port, kind
        assert probe["grpc"].get("service", "") == "", f"{kind}: the server's overall health"
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= MIN_STARTUP_SECONDS


def test_ports_match_the_flags_and_the_prometheus_annotations() -> None:
    deployment = server()
    spec = container(deployment)
    args = server_args()
    assert port_named(spec, "grpc") == (args.port or ServerSettings().port)
    assert port_named(spec, "metrics") == args.metrics_port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.metrics_port)


def test_grace_period_outlasts_the_drain() -> None:
    deployment = server()
    spec = container(deployment)
    drain = server_args().drain_timeout or ServerSettings().drain_timeout
    pre_stop = spec.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace > pre_stop + drain + SERVER_STOP_GRACE_SECONDS, (
        f"terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} s + drain "
        f"{drain} s + stop grace {SERVER_STOP_GRACE_SECONDS} s, or SIGKILL cuts requests"
    )
    # A draining server answers NOT_SERVING: liveness must not give up on it before then.
    liveness = spec["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace


def test_services_select_the_pods_and_name_their_ports() -> None:
    deployments = [o for o in objects() if o["kind"] == "Deployment"]
    for service in (o for o in objects() if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        targets = [
            d
            for d in deployments
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {targets}"
        for port in service["spec"]["ports"]:
            port_named(container(targets[0]), port["targetPort"])
    services = {o["metadata"]["name"]: o for o in objects() if o["kind"] == "Service"}
    for ingress in (o for o in objects() if o["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                ports = [p["name"] for p in services[backend["name"]]["spec"]["ports"]]
                assert backend["port"]["name"] in ports
    assert "clusterIP" not in services["kiln-server"]["spec"]  # a ClusterIP for an L7 proxy


def test_disruption_budget_and_autoscaler_target_the_servers() -> None:
    labels = server()["spec"]["template"]["metadata"]["labels"]
    pdb = one("PodDisruptionBudget", "kiln-server")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    gateway_labels = one("Deployment", "kiln-gateway")["spec"]["template"]["metadata"]["labels"]
    assert not pdb["spec"]["selector"]["matchLabels"].items() <= gateway_labels.items()
    hpa = one("HorizontalPodAutoscaler", "kiln-server")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "kiln-server",
    }
    assert "replicas" not in server()["spec"], "the HPA owns the server's replica count"
    # With maxUnavailable 1, two replicas keep one serving through a node drain.
    assert hpa["spec"]["minReplicas"] >= 2


def test_server_pods_have_shared_memory_and_writable_scratch() -> None:
    deployment = server()
    spec = container(deployment)
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in spec["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = dockerfile_env()
    for workload in workloads():
        spec = container(workload)
        if spec["securityContext"].get("readOnlyRootFilesystem"):
            paths = {m["mountPath"] for m in spec["volumeMounts"] if not m.get("readOnly")}
            for needed in ("/tmp", env["HOME"]):
                assert needed in paths, f"{workload['_file']}: {needed} is read-only"


# ---- Dockerfile ------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    instructions = [
        tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")
    ]
    last_from = max(i for i, (word, _) in enumerate(instructions) if word.upper() == "FROM")
    return [(word.upper(), rest) for word, rest in instructions[last_from:]]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_dockerfile_ports_and_healthcheck_match_the_manifests() -> None:
    args = server_args()
    exposed = {
        int(port.split("/")[0])
        for word, rest in dockerfile_instructions()
        if word == "EXPOSE"
        for port in rest.split()
    }
    assert exposed == {args.port, args.health_port, args.metrics_port}
    env = dockerfile_env()
    assert int(env["KILN_PORT"]) == args.port
    assert int(env["KILN_HEALTH_PORT"]) == args.health_port
    assert int(env["KILN_METRICS_PORT"]) == args.metrics_port
    (healthcheck,) = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"]
    assert "grpc_health" in healthcheck and "KILN_HEALTH_PORT" in healthcheck
    assert f"'{args.health_port}'" in healthcheck, "the HEALTHCHECK's default health port"
    start = re.search(r"--start-period=(\d+)s", healthcheck)
    assert start and int(start[1]) >= MIN_STARTUP_SECONDS


def test_image_user_and_volumes_match_the_pods() -> None:
    instructions = dockerfile_instructions()
    (user,) = [rest for word, rest in instructions if word == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), "a numeric USER lets the kubelet verify runAsNonRoot"
    (volumes,) = [rest for word, rest in instructions if word == "VOLUME"]
    volume_paths = set(yaml.safe_load(volumes))
    env = dockerfile_env()
    assert {env["KILN_MODELS_DIR"], env["KILN_CACHE_DIR"], "/engines"} <= volume_paths
    for workload in workloads():
        security = pod_spec(workload)["securityContext"]
        assert security["runAsNonRoot"] is True
        assert str(security["runAsUser"]) == uid and str(security["runAsGroup"]) == gid
    server_mounts = {m["mountPath"] for m in container(server())["volumeMounts"]}
    assert volume_paths <= server_mounts
    assert str(server_args().engines) == "/engines"


# ---- autoscaling metric -------------------------------------------------------------------


def adapter_rules() -> list[dict[str, Any]]:
    values = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    return values["rules"]["custom"]


def served_series() -> set[str]:
    """Every sample name `kiln serve`'s /metrics exposes (counters with _total, ...)."""
    metrics = ServerMetrics()
    metrics.declare_models(["m"])
    return {sample.name for family in metrics.registry.collect() for sample in family.samples}


def test_hpa_metric_is_served_by_the_adapter_rule() -> None:
    hpa = one("HorizontalPodAutoscaler", "kiln-server")
    served = {rule["name"]["as"] for rule in adapter_rules()}
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert names and set(names) <= served, f"HPA metrics {names}, adapter serves {served}"


def test_adapter_rules_read_series_the_server_exports() -> None:
    series = served_series()
    for rule in adapter_rules():
        queries = rule["seriesQuery"] + " " + rule["metricsQuery"]
        used = set(re.findall(r"\bkiln_[a-z_]+\b", queries))
        assert used, rule
        assert used <= series, f"not exported by kiln serve: {sorted(used - series)}"
        (selected,) = re.findall(r"\bkiln_[a-z_]+\b", rule["seriesQuery"])
        assert re.search(rule["name"]["matches"], selected), "the rule renames its own series"
        for outcome in re.findall(r'outcome="([^"]*)"', queries):
            assert outcome in OUTCOMES, outcome
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])


def test_config_map_is_a_valid_kiln_config() -> None:
    config = read_config_file(DEPLOY / "kiln.toml")
    registry = ModelRegistry.from_config(config, Path("/nonexistent"))
    assert registry.default_model in registry.models
