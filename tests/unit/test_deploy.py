"""The deployment files in deploy/ agree with the code they deploy.

Pure and fast: the files are parsed (PyYAML, JSON, a little text), never run;
no Docker daemon, Kubernetes, RabbitMQ or Redis is needed. Each test names what the
code defines (option names, metric names, queue names, defaults) and checks
that deploy/ uses the same thing, so a rename on either side fails here. The
render tests at the end also run `docker compose config` and `kubectl kustomize`
(no daemon, no cluster) where those are installed, and skip where they are not.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # PyPI: pyyaml (a test dependency)
from prometheus_client import start_http_server

from fedq.broker.topology import Topology
from fedq.common.cli import SUBCOMMANDS
from fedq.common.obs import metrics as fedq_metrics
from fedq.common.settings import Option
from fedq.coordinator.service import cli as coordinator_cli
from fedq.worker import cli as worker_cli

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_TLS = DEPLOY / "docker-compose.tls.yml"
K8S = DEPLOY / "k8s"
K8S_KEDA = DEPLOY / "k8s-keda"  # the overlay: K8S plus KEDA autoscaling
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fedq.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources"

# The options each `fedq` subcommand reads, by environment variable. FEDQ_CONFIG
# (the TOML job file) is read by every command without being an option.
OPTIONS_BY_COMMAND: dict[str, dict[str, Option]] = {
    "coordinator": {option.env_var: option for option in coordinator_cli.OPTIONS},
    "worker": {option.env_var: option for option in worker_cli.OPTIONS},
}
ALWAYS_READ = {"FEDQ_CONFIG"}
ALL_ENV_VARS = set().union(*OPTIONS_BY_COMMAND.values()) | ALWAYS_READ

# RabbitMQ series the dashboard may use: rabbitmq_prometheus 3.13 exports them
# on /metrics/per-object (the endpoint prometheus.yml scrapes). The queue gauges come
# from the core metrics collector (queue_coarse_metrics: messages_ready,
# messages_unacked, messages; queue_metrics: consumers), labelled vhost and queue.
# The alarm flags come from the alarm collector (named so since 3.10) and are
# served on the node-wide /metrics only, which prometheus.yml scrapes as well.
# All six were seen on a RabbitMQ 3.10.8 with rabbitmq_prometheus enabled. Check
# any other name against a real broker before adding it here.
RABBITMQ_METRICS = {
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_messages",
    "rabbitmq_queue_consumers",
    "rabbitmq_alarms_memory_used_watermark",
    "rabbitmq_alarms_free_disk_space_watermark",
}

# After the drain deadline, the worker still nacks its task, cancels its consumer
# and closes its connection; the grace period must leave time for that.
MIN_GRACE_MARGIN_SECONDS = 10


# -- loading ---------------------------------------------------------------------


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus compose's merge tags (``!override``, ``!reset``), read as plain values."""


for _tag in ("!override", "!reset"):
    ComposeLoader.add_constructor(
        _tag,
        lambda loader, node: (
            loader.construct_sequence(node)
            if isinstance(node, yaml.SequenceNode)
            else loader.construct_mapping(node)
            if isinstance(node, yaml.MappingNode)
            else loader.construct_scalar(node)
        ),
    )


def load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=ComposeLoader)


def k8s_files(directory: Path | None = None) -> list[Path]:
    """The manifests of the base and the KEDA overlay (or of ``directory`` only)."""
    directories = [directory] if directory else [K8S, K8S_KEDA]
    return sorted(path for folder in directories for path in folder.glob("*.yaml") if path.name != "kustomization.yaml")


def k8s_documents() -> list[dict]:
    documents = []
    for path in k8s_files():
        with open(path, encoding="utf-8") as handle:
            documents.extend(document for document in yaml.safe_load_all(handle) if document)
    return documents


def k8s_objects(kind: str) -> list[dict]:
    return [document for document in k8s_documents() if document.get("kind") == kind]


def k8s_object(kind: str, name: str) -> dict:
    matches = [document for document in k8s_objects(kind) if document["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} named {name!r} in deploy/k8s, found {len(matches)}"
    return matches[0]


def compose() -> dict:
    return load_yaml(COMPOSE)


def compose_default(value: Any) -> str:
    """A compose value as compose would interpolate it with no variables set: ``${X:-d}`` -> d;
    ``${X:?message}`` (a password, which must come from deploy/make-env.sh) -> ``<X>``."""
    text = str(value)
    text = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", text)
    text = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?[^}]*\}", r"<\1>", text)
    assert not re.search(r"\$\{[A-Za-z_]", text.replace("$$", "")), (
        f"{value!r}: give every ${{VAR}} a default (${{VAR:-default}}), or require it (${{VAR:?why}})"
    )
    return text.replace("$$", "$")


def compose_environment(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {str(key): compose_default(value) for key, value in environment.items()}


def fedq_command(command: Any) -> str | None:
    """'coordinator' / 'worker' when a compose command or container args run that subcommand."""
    if isinstance(command, str):
        command = command.split()
    for word in command or []:
        if word in OPTIONS_BY_COMMAND:
            return word
    return None


def compose_fedq_services() -> dict[str, tuple[str, dict]]:
    """{service name: (fedq subcommand, service)} for the services that run fedq."""
    services = {
        name: (fedq_command(service.get("command")), service) for name, service in compose()["services"].items()
    }
    found = {name: value for name, value in services.items() if value[0] is not None}
    assert {command for command, _ in found.values()} == {"coordinator", "worker"}, (
        "docker-compose.yml must run a fedq coordinator and fedq workers"
    )
    return found


def compose_service_running(command: str) -> tuple[str, dict]:
    matches = [(name, service) for name, (cmd, service) in compose_fedq_services().items() if cmd == command]
    assert len(matches) == 1, f"expected one compose service running fedq {command}, found {len(matches)}"
    return matches[0]


def deployment_running(command: str) -> tuple[dict, dict]:
    """(Deployment, its fedq container) of the deployment that runs ``fedq <command>``."""
    matches = []
    for deployment in k8s_objects("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if fedq_command(list(container.get("command") or []) + list(container.get("args") or [])) == command:
                matches.append((deployment, container))
    assert len(matches) == 1, f"expected one Deployment running fedq {command}, found {len(matches)}"
    return matches[0]


def container_environment(container: dict) -> dict[str, str]:
    """The environment a container gets: envFrom configmaps/secrets, then env (which wins)."""
    environment: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            environment.update(k8s_object("ConfigMap", source["configMapRef"]["name"])["data"])
        elif "secretRef" in source:
            environment.update(k8s_object("Secret", source["secretRef"]["name"]).get("stringData") or {})
    for variable in container.get("env") or []:
        environment[variable["name"]] = variable.get("value", "<from valueFrom>")
    return environment


def parse_duration(text: Any) -> float:
    """Seconds in a compose duration such as ``90s``, ``1m30s`` or ``1h``."""
    if isinstance(text, (int, float)):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|h|m|s)", str(text))
    assert parts and "".join(number + unit for number, unit in parts) == str(text).strip(), (
        f"not a compose duration: {text!r}"
    )
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(number) * scale[unit] for number, unit in parts)


def parse_conf(path: Path, separator: str | None) -> dict[str, str]:
    """key -> value of a flat config file (last occurrence wins, as in Redis and RabbitMQ)."""
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if separator:
            key, _, value = line.partition(separator)
        else:
            key, _, value = line.partition(" ")
        values[key.strip()] = value.strip()
    return values


def module_constant(path: Path, name: str) -> Any:
    """A module-level constant read from source (fedq.worker.service imports torch; too slow here)."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == name for target in node.targets):
            allowed = (ast.Expression, ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop)
            expression = ast.Expression(node.value)
            assert all(isinstance(part, allowed) for part in ast.walk(expression)), f"{name} is not arithmetic"
            return eval(compile(expression, str(path), "eval"), {"__builtins__": {}})
    raise AssertionError(f"{path} defines no {name}")


def exported_sample_names() -> dict[str, str]:
    """{sample name Prometheus sees: metric type} for every collector in fedq.common.obs.metrics."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
    }
    names = {}
    collectors = [
        value
        for value in vars(fedq_metrics).values()
        if hasattr(value, "describe") and type(value).__module__.startswith("prometheus_client")
    ]
    assert collectors, "fedq.common.obs.metrics defines no prometheus_client metrics"
    for collector in collectors:
        for family in collector.describe():
            for suffix in suffixes[family.type]:
                names[family.name + suffix] = family.type
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = []

    def panels(items: list[dict]) -> Iterator[dict]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels") or [])

    for panel in panels(dashboard.get("panels") or []):
        queries.extend(target["expr"] for target in panel.get("targets") or [] if target.get("expr"))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        queries.append(query.get("query", "") if isinstance(query, dict) else str(query or ""))
    return queries


def yaml_strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from yaml_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from yaml_strings(item)
    elif node is not None:
        yield str(node)


def metric_names(text: str, prefix: str) -> set[str]:
    return set(re.findall(rf"(?<![A-Za-z0-9_:.]){prefix}[A-Za-z0-9_:]+", text))


# -- environment variables ---------------------------------------------------


def check_env_vars(environment: dict[str, str], command: str | None, where: str) -> None:
    """Every FEDQ_* variable is read by ``command`` (or by some command) and its value parses."""
    readable = OPTIONS_BY_COMMAND[command] if command else set().union(*OPTIONS_BY_COMMAND.values())
    for name, value in environment.items():
        if not name.startswith("FEDQ_"):
            continue
        assert name in set(readable) | ALWAYS_READ, (
            f"{where}: {name} is not read by fedq {command or 'coordinator/worker'} (typo or removed option?)"
        )
        if name in ALWAYS_READ:
            continue
        option = (
            OPTIONS_BY_COMMAND[command][name]
            if command
            else next(options[name] for options in OPTIONS_BY_COMMAND.values() if name in options)
        )
        if value.startswith("<from"):
            continue
        try:
            parsed = option.parse(value)
        except (TypeError, ValueError) as error:
            raise AssertionError(f"{where}: {name}={value!r} would be refused by fedq: {error}") from None
        assert not option.choices or parsed in option.choices, f"{where}: {name}={value!r} is not a valid choice"


def test_compose_fedq_variables_are_options_of_the_service_that_reads_them():
    for name, (command, service) in compose_fedq_services().items():
        environment = compose_environment(service)
        assert "FEDQ_JOB" in environment, f"compose service {name} names no job"
        check_env_vars(environment, command, f"docker-compose.yml service {name}")
    # ${FEDQ_...} interpolations anywhere (e.g. in URLs) must also be real options.
    interpolated = set(re.findall(r"\$\{(FEDQ_[A-Z0-9_]+)", COMPOSE.read_text(encoding="utf-8")))
    assert interpolated <= ALL_ENV_VARS, f"docker-compose.yml interpolates unknown {interpolated - ALL_ENV_VARS}"


def container_env(container: dict) -> dict[str, str | None]:
    return {item["name"]: item.get("value") for item in container.get("env") or []}


def test_k8s_fedq_variables_are_options_of_the_services_that_read_them():
    for command in OPTIONS_BY_COMMAND:
        deployment, container = deployment_running(command)
        where = f"deploy/k8s Deployment {deployment['metadata']['name']}"
        # A variable set on the container itself is meant for this command.
        check_env_vars(
            {v["name"]: v.get("value", "<from valueFrom>") for v in container.get("env") or []}, command, where
        )
        # Shared configmaps and secrets: each variable must be read by at least one service.
        shared = container_environment(container)
        check_env_vars(shared, None, where + " (envFrom)")
        # The URLs come from the party's own job file (FEDQ_CONFIG, a mounted Secret).
        assert "FEDQ_JOB" in shared and container_env(container).get("FEDQ_CONFIG"), (
            f"{where}: FEDQ_JOB and the party's job file (FEDQ_CONFIG) must reach the container"
        )
    for kind, field in (("ConfigMap", "data"), ("Secret", "stringData")):
        for document in k8s_objects(kind):
            keys = set(document.get(field) or {})
            if document["metadata"]["name"].startswith("fedq-keda") or keys == {"job.toml"}:
                continue  # read by KEDA, or a party's job file, mounted (not environment variables)
            unknown = {key for key in keys if key not in ALL_ENV_VARS}
            assert not unknown, f"{kind} {document['metadata']['name']}: keys no fedq service reads: {unknown}"


def valid_job(name: str) -> bool:
    try:
        OPTIONS_BY_COMMAND["coordinator"]["FEDQ_JOB"].parse(name)
    except ValueError:
        return False
    return True


def test_job_names_are_valid():
    job = k8s_object("ConfigMap", "fedq-config")["data"]["FEDQ_JOB"]
    assert valid_job(job), f"configmap FEDQ_JOB={job!r} is not a valid job name"
    for name, (_command, service) in compose_fedq_services().items():
        compose_job = compose_environment(service)["FEDQ_JOB"]
        assert valid_job(compose_job), f"compose service {name}: FEDQ_JOB={compose_job!r} is invalid"


# -- images and files ----------------------------------------------------------


def test_compose_builds_from_the_dockerfile_and_pins_every_image():
    for name, service in compose()["services"].items():
        build = service.get("build")
        if build is not None:
            build = {"context": build} if isinstance(build, str) else build
            context = (COMPOSE.parent / build.get("context", ".")).resolve()
            assert context.is_dir(), f"compose service {name}: build context {context} does not exist"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"compose service {name}: {dockerfile} does not exist"
            assert (context / "pyproject.toml").is_file(), f"compose service {name}: context is not the repository"
        else:
            image = service.get("image", "")
            assert image, f"compose service {name} has neither build nor image"
            _repository, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
            assert tag and tag != "latest", f"compose service {name}: pin a version of {image!r}"


def test_compose_bind_mounts_exist():
    for name, service in compose()["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                path = (COMPOSE.parent / source).resolve()
                assert path.exists(), f"compose service {name} mounts {source}, which does not exist"


def test_dockerfile_installs_pinned_cpu_torch_and_runs_fedq_as_non_root():
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim" or lines[0].startswith("FROM python:3.11-slim "), lines[0]

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    torch_pin = next(dep for dep in pyproject["project"]["dependencies"] if re.match(r"torch\b", dep))
    torch_lines = [line for line in lines if "torch" in line and line.startswith("RUN")]
    assert torch_lines, "the Dockerfile does not install torch itself"
    assert any(re.search(rf"(?<![\w.=-]){re.escape(torch_pin)}(?![\w.])", line) for line in torch_lines), (
        f"the Dockerfile's torch must match pyproject.toml's {torch_pin!r}"
    )
    assert all("--index-url https://download.pytorch.org/whl/cpu" in line for line in torch_lines), (
        "install torch from the PyTorch CPU index (the PyPI Linux wheel pulls in CUDA)"
    )
    pip_installs = [line for line in lines if "pip install" in line]
    assert any(re.search(r"pip install '?\.(\[s3\])?'?(\s|$|&)", line) for line in pip_installs), (
        "the image must pip install . (with the s3 extra, for s3:// archives)"
    )
    assert not any("--index-url" in line for line in pip_installs if "torch" not in line), (
        "only torch comes from the PyTorch index; the rest from PyPI"
    )

    users = [line.split(None, 1)[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root USER"
    entrypoint = [line for line in lines if line.startswith("ENTRYPOINT")]
    assert entrypoint and json.loads(entrypoint[-1].split(None, 1)[1])[-1] == "fedq", (
        "ENTRYPOINT (exec form) must end in fedq"
    )
    assert (DEPLOY / "Dockerfile.dockerignore").read_text().count(".venv"), "keep .venv out of the build context"


# -- metrics ports and scraping --------------------------------------------------


def prometheus_jobs() -> dict[str, dict]:
    return {job["job_name"]: job for job in load_yaml(PROMETHEUS)["scrape_configs"]}


def scraped_ports(host: str) -> set[int]:
    """Ports Prometheus scrapes on a compose service, by static target or DNS discovery."""
    ports = set()
    for job in prometheus_jobs().values():
        for static in job.get("static_configs") or []:
            for target in static.get("targets") or []:
                target_host, _, port = target.rpartition(":")
                if target_host == host:
                    ports.add(int(port))
        for dns in job.get("dns_sd_configs") or []:
            if host in dns.get("names", []) or f"tasks.{host}" in dns.get("names", []):
                assert dns.get("type", "SRV") == "A", "compose DNS answers A records; SRV needs no port"
                ports.add(int(dns["port"]))
    return ports


def test_compose_metrics_port_is_the_port_prometheus_scrapes():
    for name, (_command, service) in compose_fedq_services().items():
        port = int(compose_environment(service).get("FEDQ_METRICS_PORT", "0"))
        assert port, f"compose service {name}: set FEDQ_METRICS_PORT (0 turns /metrics off)"
        assert scraped_ports(name) == {port}, (
            f"prometheus.yml scrapes {name} on {scraped_ports(name) or 'no port'}, fedq serves {port}"
        )


def test_workers_are_found_by_dns_not_a_fixed_list():
    name, _service = compose_service_running("worker")
    jobs = [
        job
        for job in prometheus_jobs().values()
        if any(name in dns.get("names", []) for dns in job.get("dns_sd_configs") or [])
    ]
    assert len(jobs) == 1, "prometheus.yml must discover the worker replicas by DNS (dns_sd_configs)"


def test_k8s_metrics_port_matches_container_port_and_scrape_annotation():
    for command in OPTIONS_BY_COMMAND:
        deployment, container = deployment_running(command)
        where = f"Deployment {deployment['metadata']['name']}"
        port = int(container_environment(container).get("FEDQ_METRICS_PORT", "0"))
        assert port, f"{where}: FEDQ_METRICS_PORT is unset or 0, so /metrics is off"
        container_ports = {p["containerPort"] for p in container.get("ports") or [] if p.get("name") == "metrics"}
        assert container_ports == {port}, f"{where}: containerPort 'metrics' {container_ports} != {port}"
        annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
        assert annotations.get("prometheus.io/scrape") == "true", f'{where}: add prometheus.io/scrape: "true"'
        assert int(annotations.get("prometheus.io/port", 0)) == port, f"{where}: prometheus.io/port != {port}"


def test_prometheus_scrapes_rabbitmq_per_object_metrics():
    paths = [
        job.get("metrics_path", "/metrics")
        for job in prometheus_jobs().values()
        if any(
            target.endswith(":15692")
            for static in job.get("static_configs") or []
            for target in static.get("targets") or []
        )
    ]
    assert paths, "prometheus.yml must scrape RabbitMQ's Prometheus plugin on :15692"
    # The default /metrics aggregates over queues: no per-queue ready/unacked series.
    assert "/metrics/per-object" in paths, paths
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text(encoding="utf-8")
    enabled = set(re.findall(r"[a-z_]+", plugins.split("[", 1)[1].split("]", 1)[0]))
    # prometheus: the scrape above; management: fedq status and KEDA's protocol http.
    assert {"rabbitmq_prometheus", "rabbitmq_management"} <= enabled, enabled


# -- metric names in queries -------------------------------------------------------


def test_dashboard_and_prometheus_use_only_exported_metric_names():
    exported = exported_sample_names()
    texts = dashboard_queries() + list(yaml_strings(load_yaml(PROMETHEUS)))
    fedq_used = set().union(*(metric_names(text, "fedq_") for text in texts))
    rabbit_used = set().union(*(metric_names(text, "rabbitmq_") for text in texts))
    assert fedq_used, "the dashboard queries no fedq_ metric"
    assert fedq_used <= set(exported), (
        f"not exported by common/metrics.py (as Prometheus names them): {sorted(fedq_used - set(exported))}"
    )
    assert rabbit_used <= RABBITMQ_METRICS, f"unchecked RabbitMQ metric names: {sorted(rabbit_used - RABBITMQ_METRICS)}"
    # histogram_quantile needs the _bucket series of a histogram.
    for text in texts:
        for argument in re.findall(r"histogram_quantile\((.*)", text):
            buckets = metric_names(argument, "fedq_")
            assert buckets and all(
                name.endswith("_bucket") and exported.get(name) == "histogram" for name in buckets
            ), f"histogram_quantile over non-bucket series: {text}"


def test_dashboard_shows_what_operators_need():
    queries = " ".join(dashboard_queries())
    for needed in (
        "rabbitmq_queue_messages_ready",
        "rabbitmq_queue_messages_unacked",
        "fedq_updates_applied_total",
        "fedq_staleness_bucket",
        'metric="accuracy"',
        "fedq_head_version",
        "fedq_updates_rejected_total",
        "rabbitmq_queue_consumers",
    ):
        assert needed in queries, f"the dashboard should show {needed}"
    for queue in (Topology("$job").tasks, Topology("$job").dead):
        assert f'queue="{queue}"' in queries, f"queue panels must select {queue}"


def test_dashboard_datasource_is_the_provisioned_one():
    uids = {source["uid"] for path in DATASOURCES.glob("*.y*ml") for source in load_yaml(path)["datasources"]}
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    used = {panel["datasource"]["uid"] for panel in dashboard["panels"] if isinstance(panel.get("datasource"), dict)}
    assert used and used <= uids, f"dashboard datasources {used} are not provisioned ({uids})"


# -- KEDA ------------------------------------------------------------------------


def test_keda_scales_workers_on_ready_plus_unacked_tasks_of_the_configured_job():
    job = k8s_object("ConfigMap", "fedq-config")["data"]["FEDQ_JOB"]
    worker_deployment, _container = deployment_running("worker")
    scaled_objects = k8s_objects("ScaledObject")
    assert len(scaled_objects) == 1
    spec = scaled_objects[0]["spec"]
    assert spec["scaleTargetRef"]["name"] == worker_deployment["metadata"]["name"]
    assert spec.get("scaleTargetRef", {}).get("kind", "Deployment") == "Deployment"
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert "replicas" not in worker_deployment["spec"], "KEDA's HPA owns the worker replicas; leave replicas unset"
    triggers = [trigger for trigger in spec["triggers"] if trigger["type"] == "rabbitmq"]
    assert len(triggers) == 1
    metadata = triggers[0]["metadata"]
    assert metadata["queueName"] == Topology(job).tasks
    # AMQP sees ready messages only; busy workers' tasks are unacked and would not count.
    assert metadata["protocol"] == "http"
    assert metadata["mode"] == "QueueLength"
    assert str(metadata.get("excludeUnacknowledged", "false")).lower() == "false"
    assert "host" not in metadata, "the management URL holds a password; take it from the TriggerAuthentication"

    authentication = k8s_object("TriggerAuthentication", triggers[0]["authenticationRef"]["name"])
    references = {ref["parameter"]: ref for ref in authentication["spec"]["secretTargetRef"]}
    assert "host" in references
    for ref in references.values():
        secret = k8s_object("Secret", ref["name"])
        values = {**(secret.get("stringData") or {}), **(secret.get("data") or {})}
        assert ref["key"] in values, f"Secret {ref['name']} has no key {ref['key']!r}"
    host = k8s_object("Secret", references["host"]["name"])["stringData"][references["host"]["key"]]
    assert host.startswith(("http://", "https://")), f"protocol http needs the management API URL, not {host!r}"


# -- coordinator and worker lifecycle --------------------------------------------------


def drain_seconds(environment: dict[str, str]) -> float:
    option = OPTIONS_BY_COMMAND["worker"]["FEDQ_DRAIN_SECONDS"]
    return option.parse(environment["FEDQ_DRAIN_SECONDS"]) if "FEDQ_DRAIN_SECONDS" in environment else option.default


def test_worker_grace_period_exceeds_drain_seconds():
    name, service = compose_service_running("worker")
    drain = drain_seconds(compose_environment(service))
    grace = parse_duration(service.get("stop_grace_period", "10s"))  # Docker's default is 10 s
    assert grace >= drain + MIN_GRACE_MARGIN_SECONDS, (
        f"compose {name}: stop_grace_period {grace:g}s must exceed FEDQ_DRAIN_SECONDS {drain:g}s plus a margin"
    )

    deployment, container = deployment_running("worker")
    drain = drain_seconds(container_environment(container))
    grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)  # k8s default
    assert grace >= drain + MIN_GRACE_MARGIN_SECONDS, (
        f"terminationGracePeriodSeconds {grace} must exceed FEDQ_DRAIN_SECONDS {drain:g} plus a margin"
    )


def test_compose_workers_can_be_scaled():
    name, service = compose_service_running("worker")
    # Either would stop `docker compose up --scale worker=N` from starting a second replica.
    assert "container_name" not in service, f"compose {name}: no container_name on a scaled service"
    assert not service.get("ports"), f"compose {name}: no host ports on a scaled service"


def test_one_coordinator_at_a_time():
    deployment, _container = deployment_running("coordinator")
    assert deployment["spec"].get("replicas") == 1
    assert deployment["spec"].get("strategy", {}).get("type") == "Recreate", (
        "RollingUpdate starts the new coordinator before the old one stops"
    )
    name, service = compose_service_running("coordinator")
    assert (service.get("deploy") or {}).get("replicas", 1) == 1, f"compose {name}: one coordinator only"
    assert not [
        s for s in k8s_objects("ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    ], "never autoscale the coordinator"


# -- broker and store configuration -------------------------------------------------


def redis_bytes(text: str) -> int:
    """A Redis memory size (``3gb``, ``2048mb``, ``1g`` = 10**9, ``100`` bytes) in bytes."""
    match = re.fullmatch(r"(\d+)(k|kb|m|mb|g|gb)?", text.strip().lower())
    assert match, f"not a Redis memory size: {text!r}"
    scale = {None: 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}
    return int(match[1]) * scale[match[2]]


def docker_bytes(text: Any) -> int:
    """A compose memory size (``5g``, ``512m``, ``1024``) in bytes; Docker's units are binary."""
    match = re.fullmatch(r"(\d+)([bkmg]?)b?", str(text).strip().lower())
    assert match, f"not a compose memory size: {text!r}"
    return int(match[1]) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match[2]]


def coordinator_budget_bytes(environment: dict[str, str]) -> int:
    """The Redis budget a coordinator runs with (--redis-budget-mb), in bytes."""
    option = OPTIONS_BY_COMMAND["coordinator"]["FEDQ_REDIS_BUDGET_MB"]
    return option.parse(environment.get("FEDQ_REDIS_BUDGET_MB", option.default)) * 2**20


REDIS_SETTINGS_ON_THE_COMMAND_LINE = ("--maxmemory", "--maxmemory-policy", "--appendonly", "--appendfsync")


def test_redis_is_durable_and_never_evicts():
    config = parse_conf(DEPLOY / "redis" / "redis.conf", None)
    # The AOF keeps the hot tier (every version not yet archived) across a restart.
    assert config.get("appendonly") == "yes"
    assert config.get("appendfsync") in ("everysec", "always")
    # Evicting a model version, the history or the applied-task ids corrupts the record.
    assert config.get("maxmemory-policy") == "noeviction"
    _name, service = next(
        (name, service)
        for name, service in compose()["services"].items()
        if str(service.get("image", "")).startswith("redis")
    )
    command = service.get("command") or []
    config_path = next(volume.split(":")[1] for volume in service["volumes"] if "redis.conf" in volume)
    assert command[:2] == ["redis-server", config_path], "compose must start redis-server with deploy/redis/redis.conf"
    assert any(str(volume).endswith(":/data") for volume in service["volumes"]), "the AOF needs a volume at /data"
    # Arguments after the file override it: neither compose file may undo the settings above.
    overlay = load_yaml(DEPLOY / "docker-compose.tls.yml")["services"].get("redis", {})
    for where, arguments in (("docker-compose.yml", command), ("docker-compose.tls.yml", overlay.get("command"))):
        arguments = arguments or []
        assert not arguments or arguments[:2] == ["redis-server", config_path], f"{where}: redis.conf first"
        overridden = [word for word in arguments if word in REDIS_SETTINGS_ON_THE_COMMAND_LINE]
        assert not overridden, f"{where} overrides redis.conf's {overridden}"


def test_redis_maxmemory_holds_the_coordinators_budget():
    config = parse_conf(DEPLOY / "redis" / "redis.conf", None)
    assert "maxmemory" in config, "redis.conf must set maxmemory (no limit: the host's memory runs out first)"
    maxmemory = redis_bytes(config["maxmemory"])
    # One job per deployment here; with more, maxmemory must exceed the sum of their budgets.
    _name, coordinator = compose_service_running("coordinator")
    _deployment, container = deployment_running("coordinator")
    for where, environment in (
        ("docker-compose.yml", compose_environment(coordinator)),
        ("deploy/k8s", container_environment(container)),
    ):
        budget = coordinator_budget_bytes(environment)
        assert maxmemory >= budget, (
            f"redis.conf maxmemory {config['maxmemory']} is below the {where} "
            f"coordinator's Redis budget ({budget // 2**20} MiB)"
        )
    redis_service = next(
        service for service in compose()["services"].values() if str(service.get("image", "")).startswith("redis")
    )
    limit = ((redis_service.get("deploy") or {}).get("resources") or {}).get("limits", {}).get("memory")
    if limit is not None:
        assert docker_bytes(limit) > maxmemory, (
            "the Redis container's memory limit must exceed maxmemory, or the kernel kills Redis first"
        )


ARCHIVE_OPTION = OPTIONS_BY_COMMAND["coordinator"]["FEDQ_ARCHIVE"]


def archive_directory(environment: dict[str, str], where: str) -> str:
    """The local directory a coordinator archives to (FEDQ_ARCHIVE must name one explicitly:
    the default, under the home directory, is not on a volume)."""
    assert "FEDQ_ARCHIVE" in environment, f"{where}: set FEDQ_ARCHIVE to a directory on a volume"
    url = ARCHIVE_OPTION.parse(environment["FEDQ_ARCHIVE"])
    assert url.lower() != "none", f"{where}: FEDQ_ARCHIVE=none keeps all history in Redis"
    assert "://" not in url and url.startswith("/"), f"{where}: FEDQ_ARCHIVE={url!r}: an absolute path here"
    return url.rstrip("/")


def covers(mount_path: str, path: str) -> bool:
    mount_path = mount_path.rstrip("/")
    return path == mount_path or path.startswith(mount_path + "/")


def test_the_coordinator_archives_to_a_volume():
    name, service = compose_service_running("coordinator")
    path = archive_directory(compose_environment(service), f"compose service {name}")
    mounts = [volume.split(":") for volume in service.get("volumes") or [] if isinstance(volume, str)]
    mount = next((parts for parts in mounts if covers(parts[1], path)), None)
    assert mount, f"compose service {name}: no volume holds the archive {path}"
    assert "ro" not in mount[2:], f"compose service {name}: the archive volume is read-only"
    assert mount[0] in (compose().get("volumes") or {}), (
        f"compose service {name}: the archive is on {mount[0]!r}, not a named volume (it would die with the container)"
    )
    # An empty named volume takes the owner of the image's directory: the image's user must own it.
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(rf"mkdir -p {re.escape(mount[1])}\b", dockerfile) and re.search(
        rf"chown (-R )?10001:10001 ({re.escape(mount[1])}|{re.escape(str(Path(mount[1]).parent))})\b", dockerfile
    ), f"the Dockerfile must create {mount[1]} owned by the fedq user"

    deployment, container = deployment_running("coordinator")
    where = f"Deployment {deployment['metadata']['name']}"
    path = archive_directory(container_environment(container), where)
    mount = next((mount for mount in container.get("volumeMounts") or [] if covers(mount["mountPath"], path)), None)
    assert mount and not mount.get("readOnly"), f"{where}: mount a writable volume at {path}"
    volume = next(
        volume for volume in deployment["spec"]["template"]["spec"]["volumes"] if volume["name"] == mount["name"]
    )
    assert "persistentVolumeClaim" in volume, (
        f"{where}: the archive must be on a PersistentVolumeClaim, not "
        f"{sorted(set(volume) - {'name'})} (it would die with the pod)"
    )
    claim = k8s_object("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert "ReadWriteOnce" in claim["spec"]["accessModes"] or "ReadWriteMany" in claim["spec"]["accessModes"]
    # fsGroup makes the claim writable by the image's user (test_each_party_reads_its_own_job_file...).
    assert deployment["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001


def test_rabbitmq_limits_fit_fedq():
    config = parse_conf(DEPLOY / "rabbitmq" / "rabbitmq.conf", "=")
    # A worker holds its task unacked while it trains: the broker must not take it
    # away from a healthy worker before the coordinator's own lease ends, nor
    # within the longest task time fedq's histogram is built to measure.
    consumer_timeout_seconds = int(config["consumer_timeout"]) / 1000
    lease = OPTIONS_BY_COMMAND["coordinator"]["FEDQ_TASK_LEASE_SECONDS"].default
    assert consumer_timeout_seconds > lease
    assert consumer_timeout_seconds > max(fedq_metrics.TASK_SECONDS_BUCKETS)
    # Large deltas travel as Redis claim checks; inline ones (base64 in JSON) must fit.
    inline_limit = module_constant(ROOT / "common" / "wire" / "limits.py", "INLINE_LIMIT_BYTES")
    max_message_size = int(config["max_message_size"])
    assert 4 * inline_limit <= max_message_size <= 16 * 1024 * 1024, (
        "keep max_message_size modest (RabbitMQ 4's 16 MiB) but above inline updates"
    )
    assert "vm_memory_high_watermark.relative" in config or "vm_memory_high_watermark.absolute" in config
    assert config.get("default_user", "") != "guest" and config.get("default_pass", "") != "guest"

    rabbitmq = next(
        service for service in compose()["services"].values() if str(service.get("image", "")).startswith("rabbitmq")
    )
    environment = compose_environment(rabbitmq)
    assert environment.get("RABBITMQ_DEFAULT_USER") not in (None, "", "guest"), "create a non-guest user"
    assert any("rabbitmq.conf" in volume for volume in rabbitmq["volumes"]), "compose must mount rabbitmq.conf"
    for name, (_command, service) in compose_fedq_services().items():
        environment = compose_environment(service)
        assert "FEDQ_AMQP_URL" not in environment and "FEDQ_REDIS_URL" not in environment, (
            f"compose {name}: the URLs (and passwords) come from its own job file"
        )
        assert "--config" in service["command"], f"compose {name} reads no job file"
    enroll = compose_environment(compose()["services"]["enroll"])
    assert "guest:" not in enroll["FEDQ_AMQP_URL"] and "<RABBITMQ_PASSWORD>" in enroll["FEDQ_AMQP_URL"]
    for password in ("RABBITMQ_PASSWORD", "REDIS_PASSWORD", "GRAFANA_PASSWORD"):
        assert re.search(r"\$\{%s:\?" % password, COMPOSE.read_text()), f"{password} has a default"


# -- manifests as a set ----------------------------------------------------------------


def test_k8s_manifests_are_namespace_agnostic_and_all_in_kustomization():
    for document in k8s_documents():
        assert "namespace" not in document["metadata"], (
            f"{document['kind']} {document['metadata']['name']} names a namespace"
        )
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert listed == {path.name for path in k8s_files(K8S)}, "k8s/kustomization.yaml must list every manifest"
    # The overlay is the base plus its own files; it is a sibling, as kustomize refuses a base that
    # contains its overlay ("cycle detected").
    overlay = load_yaml(K8S_KEDA / "kustomization.yaml")
    assert set(overlay["resources"]) == {"../k8s"} | {path.name for path in k8s_files(K8S_KEDA)}


def test_the_base_applies_without_keda():
    """`kubectl apply -k deploy/k8s` must work on a cluster without KEDA's CRDs: no keda.sh object in
    the base; the ScaledObject, its TriggerAuthentication and their Secret are in the overlay."""
    for path in k8s_files(K8S):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document:
                assert not document["apiVersion"].startswith("keda.sh/"), f"{path.name}: {document['kind']}"
                assert not document["metadata"]["name"].startswith("fedq-keda"), f"{path.name}: KEDA's Secret"
    overlay = [
        document
        for path in k8s_files(K8S_KEDA)
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if document
    ]
    assert {"ScaledObject", "TriggerAuthentication"} <= {document["kind"] for document in overlay}
    for path in (DEPLOY / "README.md", K8S / "kustomization.yaml", K8S_KEDA / "kustomization.yaml"):
        text = path.read_text(encoding="utf-8")
        for command in ("kubectl apply -k deploy/k8s ", "kubectl apply -k deploy/k8s-keda "):
            assert command in text, f"{path.relative_to(ROOT)} must show `{command.strip()} -n ...`"


def test_each_party_reads_its_own_job_file_and_no_shared_credentials():
    """Coordinator and workers mount different Secrets (docs/security.md): no URL with a password
    is shared between them through the ConfigMap or a common Secret."""
    deployments = {
        document["metadata"]["name"]: document for document in k8s_documents() if document.get("kind") == "Deployment"
    }
    secrets = {}
    for name, deployment in deployments.items():
        spec = deployment["spec"]["template"]["spec"]
        container = spec["containers"][0]
        environment = {item["name"]: item.get("value") for item in container.get("env", [])}
        assert environment.get("FEDQ_CONFIG") == "/etc/fedq/job.toml", name
        assert not any(source.get("secretRef") for source in container.get("envFrom", [])), name
        mounted = {volume["name"]: volume["secret"]["secretName"] for volume in spec["volumes"] if "secret" in volume}
        secrets[name] = set(mounted.values())
        assert spec["securityContext"]["fsGroup"] == 10001, "the image's user reads the job file"
    assert secrets["fedq-coordinator"].isdisjoint(secrets["fedq-worker"])
    for document in k8s_documents():
        if document.get("kind") == "Secret" and "job.toml" in document.get("stringData", {}):
            job_file = tomllib.loads(document["stringData"]["job.toml"])["job"]
            assert "guest" not in job_file["amqp_url"]
    configmap = next(document for document in k8s_documents() if document.get("kind") == "ConfigMap")
    assert not {"FEDQ_AMQP_URL", "FEDQ_REDIS_URL"} & set(configmap["data"])


# -- joining from outside, status, probes, partitions ------------------------------------


def published(service: dict) -> dict[int, tuple[str, str]]:
    """{container port: (host address, host port)} of a compose service's short-syntax ports."""
    ports = {}
    for entry in service.get("ports") or []:
        parts = compose_default(entry).split(":")  # [[address:]host port:]container port[/protocol]
        address = parts[0] if len(parts) == 3 else "0.0.0.0"
        ports[int(parts[-1].split("/")[0])] = (address, parts[-2] if len(parts) > 1 else "")
    return ports


def service_by_image(services: dict, prefix: str) -> dict:
    return next(service for service in services.values() if str(service.get("image", "")).startswith(prefix))


def test_compose_publishes_rabbitmq_and_redis_for_outside_workers():
    """Workers "started anywhere" reach a compose deployment's RabbitMQ and Redis: the base file
    publishes the plain ports and the TLS overlay the TLS ones instead (the plain ones are closed
    there), on one configurable address that defaults to this host only."""
    services = compose()["services"]
    tls = load_yaml(COMPOSE_TLS)["services"]
    tls_conf = parse_conf(DEPLOY / "rabbitmq" / "tls.conf", "=")
    assert tls_conf.get("listeners.tcp") == "none", "the TLS overlay closes plain AMQP"
    redis_tls_command = tls["redis"]["command"]
    assert redis_tls_command[redis_tls_command.index("--port") + 1] == "0", "the TLS overlay closes plain Redis"
    redis_tls_port = int(redis_tls_command[redis_tls_command.index("--tls-port") + 1])
    amqps_port = int(tls_conf["listeners.ssl.default"])
    for where, rabbitmq, redis, amqp_port, redis_port, closed in (
        (
            "docker-compose.yml",
            service_by_image(services, "rabbitmq"),
            service_by_image(services, "redis"),
            5672,
            6379,
            (),
        ),
        ("docker-compose.tls.yml", tls["rabbitmq"], tls["redis"], amqps_port, redis_tls_port, (5672, 6379)),
    ):
        ports = {**published(rabbitmq), **published(redis)}
        for port in (amqp_port, redis_port):
            assert port in ports, f"{where}: publish {port} for workers outside compose"
            assert ports[port][0] == "127.0.0.1", f"{where}: {port} on 127.0.0.1 by default, not {ports[port][0]}"
        for port in closed:
            assert port not in ports, f"{where}: {port} is closed with TLS; don't publish it"
    text = COMPOSE.read_text(encoding="utf-8") + COMPOSE_TLS.read_text(encoding="utf-8")
    addresses = set(re.findall(r'"\$\{([A-Z_]+):-127\.0\.0\.1\}:[^"]*:(?:5672|6379|5671|6380)"', text))
    assert len(addresses) == 1, f"one variable for the address RabbitMQ and Redis are published on: {addresses}"
    # The overlay must replace (not add to) the base file's list: compose merges lists otherwise.
    assert COMPOSE_TLS.read_text(encoding="utf-8").count("ports: !override") == 2
    assert re.search(rf"^{addresses.pop()}=127\.0\.0\.1$", (DEPLOY / ".env.example").read_text(), re.MULTILINE)


DOCUMENTED_COMPOSE = re.compile(r"docker compose(?: -f \S+)* (run|exec)((?: --?[\w-]+)*) ([\w-]+) ([^`\n]*)")


def test_documented_compose_commands_run_fedq_as_the_image_expects():
    """The image's ENTRYPOINT is `fedq`: `docker compose run SERVICE status ...` runs `fedq status`,
    while `exec` bypasses the entrypoint and must name `fedq` itself. Every `fedq status` shown
    for compose is the same command."""
    paths = [ROOT / "README.md", DEPLOY / "README.md", COMPOSE, COMPOSE_TLS, *sorted((ROOT / "docs").glob("*.md"))]
    texts = {path.relative_to(ROOT): path.read_text(encoding="utf-8") for path in paths}
    services = compose()["services"]
    status_commands = set()
    for where, text in texts.items():
        for verb, _options, service, rest in DOCUMENTED_COMPOSE.findall(text.replace("\\\n", " ")):
            words = rest.split("#")[0].split()
            if words[:1] == ["..."]:
                continue  # prose: `docker compose run --rm coordinator ...`
            assert service in services, f"{where}: docker compose {verb} {service}: no such service"
            assert services[service].get("build") or "fedq" in str(services[service].get("image")), (
                f"{where}: {service} does not run the fedq image"
            )
            if verb == "exec":
                assert words and words[0] == "fedq", (
                    f"{where}: `exec {service} {rest}` skips the entrypoint; start the command with fedq"
                )
                words = words[1:]
            assert words and words[0] in SUBCOMMANDS, (
                f"{where}: `{verb} {service} {rest}` runs `fedq {words[0] if words else ''}`, not a fedq command"
            )
            if words[0] == "status":
                status_commands.add(" ".join([verb, service] + words))
    assert len(status_commands) == 1, f"the docs disagree on how to run fedq status in compose: {status_commands}"
    config = status_commands.pop().split("--config ", 1)[1].split()[0]
    enroll = " ".join(services["enroll"]["command"])
    assert Path(config).stem in enroll and "monitor:" in enroll, f"{config}: enroll writes no monitor job file there"


def metrics_main_calls_serve_metrics_first(path: Path) -> None:
    """main() starts the /metrics server before any other import (torch takes seconds), in-process."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    calls = [
        index
        for index, statement in enumerate(main.body)
        for node in ast.walk(statement)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "serve_metrics"
    ]
    imports = [
        index for index, statement in enumerate(main.body) if isinstance(statement, (ast.Import, ast.ImportFrom))
    ]
    assert calls, f"{path}: main() no longer calls serve_metrics; the probes on /metrics would fail"
    assert not imports or calls[0] < imports[0], f"{path}: serve_metrics after the service's imports"


def test_probes_and_health_checks_ask_metrics():
    for path in (ROOT / "coordinator" / "service" / "cli.py", ROOT / "worker" / "cli.py"):
        metrics_main_calls_serve_metrics_first(path)
    for command in OPTIONS_BY_COMMAND:
        deployment, container = deployment_running(command)
        where = f"Deployment {deployment['metadata']['name']}"
        port = int(container_environment(container)["FEDQ_METRICS_PORT"])
        names = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
        for kind in ("readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            assert probe and "httpGet" in probe, f"{where}: add an httpGet {kind} on /metrics"
            assert probe["httpGet"]["path"] == "/metrics"
            assert names.get(probe["httpGet"]["port"], probe["httpGet"]["port"]) == port, f"{where}: {kind} port"
            assert probe.get("timeoutSeconds", 1) >= 5, f"{where}: {kind}: a busy node answers slowly"
        liveness = container["livenessProbe"]
        # torch's import and a loaded node: a restart only after minutes without an answer.
        assert liveness.get("initialDelaySeconds", 0) >= 30
        assert liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3) >= 120, (
            f"{where}: liveness restarts too soon"
        )

    for command in OPTIONS_BY_COMMAND:
        name, service = compose_service_running(command)
        check = service.get("healthcheck") or {}
        assert "/metrics" in " ".join(check.get("test") or []), f"compose {name}: a health check on /metrics"
        assert parse_duration(check.get("start_period", "0s")) >= 30


def test_compose_health_check_command_works():
    """The compose health check's command, run here against a real prometheus_client server."""
    _name, service = compose_service_running("worker")
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python", "the image has python, not curl"
    command = [sys.executable, *test[2:]]
    server, thread = start_http_server(0, addr="127.0.0.1")
    environment = {**os.environ, "FEDQ_METRICS_PORT": str(server.server_port)}
    try:
        result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, result.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode != 0, "the health check passes with nothing listening"


def test_workers_lease_their_partitions():
    """A worker given neither --partition nor --data asks the coordinator for a partition lease; the
    deployments give neither, and name each replica <site>.<hostname>, which the site's Redis user may
    read the lease of (coordinator/ops/roles.py)."""
    worker_options = OPTIONS_BY_COMMAND["worker"]
    assert worker_options["FEDQ_PARTITION"].default is None and worker_options["FEDQ_DATA"].default is None
    name, service = compose_service_running("worker")
    site = Path(service["command"][service["command"].index("--config") + 1]).stem
    deployment, container = deployment_running("worker")
    secret = next(
        volume["secret"]["secretName"]
        for volume in deployment["spec"]["template"]["spec"]["volumes"]
        if "secret" in volume
    )
    for where, environment, enrolled in (
        (f"compose {name}", compose_environment(service), site),
        (
            f"Deployment {deployment['metadata']['name']}",
            container_environment(container),
            secret.removeprefix("fedq-"),
        ),
    ):
        assert not {"FEDQ_PARTITION", "FEDQ_DATA"} & set(environment), (
            f"{where}: a fixed partition or data stops the coordinator's leases"
        )
        assert environment.get("FEDQ_WORKER_ID") == f"{enrolled}.{{hostname}}", (
            f"{where}: worker ids <site>.{{hostname}}, as replicas of the enrolled site {enrolled!r}"
        )


# -- rendering with the real tools (skipped where they are missing) --------------------------


def tool_environment(**extra: str) -> dict[str, str]:
    """The caller's environment without anything compose would interpolate or pick up by itself."""
    keep = {
        key: value
        for key, value in os.environ.items()
        if key in ("PATH", "HOME", "DOCKER_CONFIG", "TMPDIR", "LANG", "LC_ALL")
    }
    return {**keep, **extra}


def run_tool(*command: str, **extra_env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=ROOT, env=tool_environment(**extra_env), capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    return result


def compose_plugin_version() -> tuple[int, ...] | None:
    if not shutil.which("docker"):
        return None
    result = subprocess.run(
        ["docker", "compose", "version", "--short"],
        env=tool_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.match(r"v?(\d+)\.(\d+)\.(\d+)", result.stdout.strip())
    return tuple(int(part) for part in match.groups()) if result.returncode == 0 and match else None


def test_docker_compose_config_accepts_both_files(tmp_path):
    version = compose_plugin_version()
    if version is None:
        pytest.skip("`docker compose version` failed: the Docker Compose plugin is not installed")
    if version < (2, 24, 4):
        pytest.skip(f"Docker Compose {'.'.join(map(str, version))}: the TLS overlay's !override needs 2.24.4")
    # As deploy/make-env.sh writes it: generated passwords (fixed here) and .env.example's settings.
    env_file = tmp_path / "fedq.env"
    settings = [
        line
        for line in (DEPLOY / ".env.example").read_text().splitlines()
        if re.match(r"(BROKER_BIND_ADDRESS|FEDQ_[A-Z_]+)=", line)
    ]
    env_file.write_text(
        "\n".join(
            [
                "RABBITMQ_USER=fedq-admin",
                "RABBITMQ_PASSWORD=test-rabbitmq",
                "REDIS_PASSWORD=test-redis",
                "GRAFANA_PASSWORD=test-grafana",
                *settings,
            ]
        )
        + "\n"
    )
    rendered = {}
    for files in ((COMPOSE,), (COMPOSE, COMPOSE_TLS)):
        arguments = [word for path in files for word in ("-f", str(path))]
        result = run_tool("docker", "compose", "--env-file", str(env_file), *arguments, "config", "--format", "json")
        assert "WARN" not in result.stderr, result.stderr  # e.g. a variable that is not set
        rendered[files[-1].name] = json.loads(result.stdout)["services"]
    for name, services in rendered.items():
        ports = {int(port["target"]): port for service in services.values() for port in service.get("ports") or []}
        expected = {5672, 6379} if name == COMPOSE.name else {5671, 6380}
        assert expected <= set(ports) and not ({5672, 6379, 5671, 6380} - expected) & set(ports), (
            f"{name}: published {sorted(ports)}"
        )
        assert all(ports[port]["host_ip"] == "127.0.0.1" for port in expected)
        for service in ("coordinator", "worker"):
            assert services[service]["healthcheck"]["test"][:2] == ["CMD", "python"]
        assert services["enroll"]["environment"]["FEDQ_AMQP_URL"].startswith(
            "amqp://" if name == COMPOSE.name else "amqps://"
        )


def test_kubectl_kustomize_builds_the_base_and_the_keda_overlay():
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed")
    built = {}
    for directory in (K8S, K8S_KEDA):
        output = run_tool("kubectl", "kustomize", str(directory.relative_to(ROOT))).stdout
        built[directory.name] = [document for document in yaml.safe_load_all(output) if document]
    kinds = {
        name: sorted((document["kind"], document["metadata"]["name"]) for document in documents)
        for name, documents in built.items()
    }
    assert not [document for document in built["k8s"] if document["apiVersion"].startswith("keda.sh/")]
    added = set(kinds["k8s-keda"]) - set(kinds["k8s"])
    assert set(kinds["k8s"]) <= set(kinds["k8s-keda"]) and {kind for kind, _ in added} == {
        "ScaledObject",
        "TriggerAuthentication",
        "Secret",
    }, f"the overlay adds {sorted(added)}"
    for documents in built.values():
        for deployment in (document for document in documents if document["kind"] == "Deployment"):
            container = deployment["spec"]["template"]["spec"]["containers"][0]
            assert container.get("livenessProbe") and container.get("readinessProbe"), deployment["metadata"]["name"]
