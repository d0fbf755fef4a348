"""compose/: every compose file validates against the official compose-spec JSON schema, every Kubernetes
manifest against the Kubernetes JSON schemas (strict: unknown fields rejected), and every service's command
parses with our CLI and is the command ``splitserve up`` runs for that role (same subcommand, same flags in
the same order; only addresses and ids differ). No Docker engine or cluster is needed.

Schemas come from PyPI packages, installed without their dependencies:
``docker-compose==1.29.2`` ships ``compose/config/compose_spec.json`` and ``kubernetes-validate==1.37.0``
ships ``kubernetes_validate/kubernetes-json-schema/v*-local-strict``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from splitserve import launcher
from splitserve.cli import build_parser

COMPOSE_DIR = Path(__file__).resolve().parent.parent / "compose"
K8S_DIR = COMPOSE_DIR / "k8s"
COMPOSE_FILES = sorted(COMPOSE_DIR.glob("compose.*.yaml"))
K8S_FILES = sorted(K8S_DIR.glob("*.yaml"))
BASE_ENV = {"SPLITSERVE_ADMIN_TOKEN": "test-token", "SPLITSERVE_MODELS_DIR": "/srv/models"}
# compose.npmd.yaml with a 1P3D split instead of its default roles
NPMD_1P3D = {**BASE_ENV, **{f"SPLITSERVE_GPU{i}_ROLE": "decode" for i in range(1, 8)}}

_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(value, env: dict[str, str]):
    """Compose-style variable substitution (``${V}``, ``${V:-default}``, ``${V-default}``, ``${V:?error}``, ``$$``)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        val = env.get(name)
        unset = val is None or (op is not None and op.startswith(":") and val == "")
        if op and op.endswith("?") and unset:
            raise KeyError(f"required variable {name} is not set: {arg}")
        if op and op.endswith("-") and unset:
            return arg
        return val or ""

    return _VAR.sub(sub, value)


def _schema_file(dist: str, rel: str) -> Path:
    try:
        return Path(importlib.metadata.distribution(dist).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{dist} is not installed: `pip install --no-deps` it (see this module's docstring)")


@pytest.fixture(scope="module")
def compose_validator():
    schema = json.loads(_schema_file("docker-compose", "compose/config/compose_spec.json").read_text())
    return jsonschema.Draft201909Validator(schema)


def _k8s_schema_dir() -> Path:
    root = _schema_file("kubernetes-validate", "kubernetes_validate/kubernetes-json-schema")
    dirs = [d for d in root.iterdir() if d.name.endswith("-local-strict")]
    return max(dirs, key=lambda d: tuple(int(x) for x in d.name[1:].split("-")[0].split(".")))


@pytest.fixture(scope="module")
def k8s_validator_for():
    schema_dir = _k8s_schema_dir()
    definitions = json.loads((schema_dir / "_definitions.json").read_text())
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))

    def validator(doc: dict) -> jsonschema.protocols.Validator:
        group, _, version = doc["apiVersion"].rpartition("/")
        name = "-".join(p for p in (doc["kind"].lower(), group.split(".")[0], version) if p) + ".json"
        path = schema_dir / name
        if not path.exists():
            pytest.fail(f"no Kubernetes schema {name} in {schema_dir}")
        return jsonschema.Draft202012Validator(json.loads(path.read_text()), registry=registry)

    return validator


def load_compose(path: Path, env: dict[str, str]) -> dict:
    return interpolate(yaml.safe_load(path.read_text()), env)


def _flags(argv: list[str]) -> list[str]:
    """Subcommand and option names, in order (values dropped)."""
    return [argv[1]] + [a for a in argv[2:] if a.startswith("--")]


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _up_children(device: str, transfer: str, n_prefill: int, n_decode: int) -> list[launcher.Child]:
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    argv = ["--prefill", str(n_prefill), "--decode", str(n_decode), "--device", device, "--transfer", transfer]
    if device == "cuda":
        argv += ["--num-gpus", str(n_prefill + n_decode)]
    return launcher.plan_commands(parser.parse_args(argv), 8100)


# ---------------------------------------------------------------------------------------------- compose


def test_compose_files_exist():
    assert {p.name for p in COMPOSE_FILES} == {"compose.1p1d.yaml", "compose.npmd.yaml", "compose.cpu.yaml"}
    assert (COMPOSE_DIR / "Dockerfile").exists()


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_compose_spec(path, compose_validator):
    for env in (BASE_ENV, NPMD_1P3D):
        doc = load_compose(path, env)
        errors = sorted(compose_validator.iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_schema_rejects_a_broken_file(compose_validator):
    doc = load_compose(COMPOSE_DIR / "compose.1p1d.yaml", BASE_ENV)
    bad = copy.deepcopy(doc)
    bad["services"]["prefill-0"]["deploy"]["resources"]["reservations"]["devices"][0]["gpus"] = 1
    assert list(compose_validator.iter_errors(bad))
    bad = copy.deepcopy(doc)
    bad["services"]["router"]["restart"] = ["always"]
    assert list(compose_validator.iter_errors(bad))


def test_required_variables_are_enforced():
    with pytest.raises(KeyError, match="SPLITSERVE_ADMIN_TOKEN"):
        load_compose(COMPOSE_DIR / "compose.cpu.yaml", {})
    assert interpolate("a$${X}b${Y:-d}${Z-e}", {"Z": ""}) == "a${X}bd"


@pytest.mark.parametrize(
    "name,env,profiles,device,n_prefill,n_decode",
    [
        ("compose.1p1d.yaml", BASE_ENV, (), "cuda", 1, 1),
        ("compose.npmd.yaml", BASE_ENV, (), "cuda", 1, 1),  # GPUs 0-1: even prefill, odd decode
        ("compose.npmd.yaml", BASE_ENV, ("gpus8",), "cuda", 4, 4),
        ("compose.npmd.yaml", NPMD_1P3D, ("gpus4",), "cuda", 1, 3),
        ("compose.cpu.yaml", BASE_ENV, (), "cpu", 1, 1),
    ],
)
def test_service_commands_are_what_splitserve_up_runs(name, env, profiles, device, n_prefill, n_decode):
    doc = load_compose(COMPOSE_DIR / name, env)
    services = {n: s for n, s in doc["services"].items() if not set(s.get("profiles", [])) or set(s["profiles"]) & set(profiles)}
    router = services.pop("router")["command"]
    for argv in [router] + [s["command"] for s in services.values()]:
        assert argv[0] == "splitserve"
        build_parser(argv[1:]).parse_args(argv[1:])  # raises SystemExit on an unknown flag or bad value
    transfer = _opt(next(iter(services.values()))["command"], "--transfer")
    children = _up_children(device, transfer, n_prefill, n_decode)
    up_by_role = {c.argv[1]: c.argv for c in children}
    assert _flags(router) == _flags(up_by_role["router"])
    roles = []
    for svc_name, svc in services.items():
        argv = svc["command"]
        role = argv[1]
        roles.append(role)
        assert _flags(argv) == _flags(up_by_role[role]), svc_name
        assert _opt(argv, "--role") == role and _opt(argv, "--device") == device
        assert _opt(argv, "--model") == _opt(router, "--model")
        assert _opt(argv, "--router-addr") == f"tcp://router:{_opt(router, '--control-port')}"
        assert _opt(argv, "--host") == svc["hostname"]  # reachable by its peers under this name
        assert ("deploy" in svc) == (device == "cuda")
    assert (roles.count("prefill"), roles.count("decode")) == (n_prefill, n_decode)


def _gpu_reservation(svc: dict) -> dict:
    (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
    return dev


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_operational_settings(path):
    doc = load_compose(path, BASE_ENV)
    router = doc["services"]["router"]
    assert "/health" in " ".join(router["healthcheck"]["test"])
    assert router["environment"]["SPLITSERVE_ADMIN_TOKEN"] == "test-token"
    assert router["ports"] == ["8000:8000"]
    gpu_ids = []
    for name, svc in doc["services"].items():
        assert svc["restart"] == "unless-stopped", name
        assert "models:/models:ro" in svc["volumes"], name
        if name != "router":
            assert svc["depends_on"] == {"router": {"condition": "service_started"}}
        if "deploy" in svc:
            dev = _gpu_reservation(svc)
            assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
            gpu_ids += dev["device_ids"]
    assert len(gpu_ids) == len(set(gpu_ids))  # one GPU per worker
    assert "models" in doc["volumes"]


def test_npmd_ratio_is_set_by_environment_and_profiles():
    doc = load_compose(COMPOSE_DIR / "compose.npmd.yaml", NPMD_1P3D)
    workers = {n: s for n, s in doc["services"].items() if n != "router"}
    assert len(workers) == 8
    roles = {n: s["command"][1] for n, s in workers.items()}
    assert roles == {"gpu0": "prefill", **{f"gpu{i}": "decode" for i in range(1, 8)}}
    assert [_gpu_reservation(workers[f"gpu{i}"])["device_ids"] for i in range(8)] == [[str(i)] for i in range(8)]
    assert all("profiles" not in workers[f"gpu{i}"] for i in (0, 1))
    assert all("gpus8" in workers[f"gpu{i}"]["profiles"] for i in range(2, 8))
    assert all("gpus4" in workers[f"gpu{i}"]["profiles"] for i in (2, 3))


# ---------------------------------------------------------------------------------------------- kubernetes


def _k8s_docs():
    for path in K8S_FILES:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                yield f"{path.name}#{i}", doc


def test_k8s_manifests_match_kubernetes_schemas(k8s_validator_for):
    kinds = []
    for where, doc in _k8s_docs():
        errors = list(k8s_validator_for(doc).iter_errors(doc))
        assert not errors, f"{where}: " + "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
        kinds.append((doc["kind"], doc["metadata"]["name"]))
    assert ("Deployment", "splitserve-router") in kinds and ("Service", "splitserve-router") in kinds
    assert ("Deployment", "splitserve-prefill") in kinds and ("Deployment", "splitserve-decode") in kinds


def test_k8s_schema_is_strict(k8s_validator_for):
    doc = next(d for _, d in _k8s_docs() if d["kind"] == "Deployment")
    bad = copy.deepcopy(doc)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    assert list(k8s_validator_for(bad).iter_errors(bad))


def _deployments() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in _k8s_docs() if d["kind"] == "Deployment"}


def test_k8s_router_readiness_workers_gpus_and_commands():
    deps = _deployments()
    env = {"SPLITSERVE_MODEL": "builtin:tiny-random-llama", "SPLITSERVE_TRANSFER": "zmq",
           "POD_NAME": "pod-0", "POD_IP": "10.0.0.7"}
    router = deps["splitserve-router"]["spec"]["template"]["spec"]["containers"][0]
    assert router["readinessProbe"]["httpGet"]["path"] == "/health"
    children = {c.argv[1]: c.argv for c in _up_children("cuda", "zmq", 1, 1)}
    for name in ("splitserve-router", "splitserve-prefill", "splitserve-decode"):
        (container,) = deps[name]["spec"]["template"]["spec"]["containers"]
        # Kubernetes expands $(VAR) in commands from the container's environment
        argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["command"]]
        build_parser(argv[1:]).parse_args(argv[1:])
        assert _flags(argv) == _flags(children[argv[1]])
        if name != "splitserve-router":
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert _opt(argv, "--router-addr") == "tcp://splitserve-router:8100"


# ---------------------------------------------------------------------------------------------- as processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _localize(argv: list[str], hosts: set[str], ports: dict[str, str]) -> list[str]:
    """The compose command with service names and 0.0.0.0 as 127.0.0.1 and the fixed ports as free ones."""
    out = []
    for prev, arg in zip([""] + argv, argv):
        if prev in ("--host", "--control-host") and arg in hosts:
            arg = "127.0.0.1"
        elif prev in ("--port", "--control-port") and arg in ports:
            arg = ports[arg]
        elif arg.startswith("tcp://"):
            host, _, port = arg[len("tcp://"):].rpartition(":")
            arg = f"tcp://{'127.0.0.1' if host in hosts else host}:{ports.get(port, port)}"
        out.append(arg)
    return out


def _wait_healthy(url: str, procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead, f"exited early: {dead}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"{url}/health never answered 200")


def test_cpu_compose_topology_runs_as_processes(tmp_path, capsys):
    """compose.cpu.yaml's services, started as real processes on loopback with exactly their commands
    (addresses localized), serve completions and answer bench serve; SIGTERM stops all of them."""
    doc = load_compose(COMPOSE_DIR / "compose.cpu.yaml", BASE_ENV)
    http = str(_free_port())
    ports = {"8000": http, "8100": str(_free_port())}
    hosts = set(doc["services"]) | {"0.0.0.0"}
    procs = []
    try:
        for name, svc in doc["services"].items():  # router first, as compose's depends_on orders them
            argv = _localize(svc["command"], hosts, ports)
            env = {**os.environ, **svc.get("environment", {})}
            log = open(tmp_path / f"{name}.log", "wb")
            procs.append(subprocess.Popen([sys.executable, "-m", "splitserve.cli", *argv[1:]], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{http}"
        _wait_healthy(url, procs, 180.0)
        body = json.dumps({"model": "builtin:tiny-random-llama", "prompt": "Once upon a time", "max_tokens": 4,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            out = json.loads(resp.read())
        assert out["usage"]["completion_tokens"] == 4 and out["choices"][0]["finish_reason"] == "length"
        argv = ["bench", "serve", "--url", url, "--input-len", "8", "--output-len", "3", "--num-prompts", "3", "--json"]
        from splitserve.benchmarks import serve

        assert serve.main(build_parser(argv).parse_args(argv)) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["completed"], report["failed"], report["output_tokens"]) == (3, 0, 9)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        stuck = []
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                stuck.append(p.args)
                p.kill()
                p.wait()
    assert not stuck, f"did not stop on SIGTERM: {stuck}"
