"""compose/: every compose file validates against the official compose-spec JSON schema, every Kubernetes
manifest against the Kubernetes JSON schemas (strict: unknown fields rejected), and every service's command
parses with our CLI and is the command ``splitserve up`` runs for that role (same subcommand, same flags in
the same order; only addresses and ids differ, and the key set and admin token come from mounted secrets). No Docker
engine or cluster is needed.

Security (docs/security.md, "Deploying with compose and Kubernetes"): every router and worker service passes
``--keys-dir`` pointing at the read-only mount of the key set that the one-shot ``keys`` compose service writes (a
Secret in Kubernetes, each role getting only its own secret key), the admin token is a secret file, only the router's
HTTP port is published, and the Kubernetes NetworkPolicies admit the control port and the workers' ports from worker
pods only. Each checker returns its findings, and each is also shown to find a deliberately broken copy.

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
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from splitserve import launcher
from splitserve.cli import build_parser
from splitserve.core import keys as curve_keys

COMPOSE_DIR = Path(__file__).resolve().parent.parent / "compose"
K8S_DIR = COMPOSE_DIR / "k8s"
COMPOSE_FILES = sorted(COMPOSE_DIR.glob("compose.*.yaml"))
K8S_FILES = sorted(K8S_DIR.glob("*.yaml"))
BASE_ENV = {"SPLITSERVE_MODELS_DIR": "/srv/models"}
KEYS_DIR = "/etc/splitserve/keys"  # where every container finds the key set (compose volume, Kubernetes Secret)
WORKER_COMMANDS = {"prefill", "decode", "worker"}
SECRET_VARIABLES = ("SPLITSERVE_ADMIN_TOKEN", "SPLITSERVE_API_KEY")
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
    """What ``splitserve up`` starts, ``--keys-dir`` included (it adds its key set to every child)."""
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    argv = ["--prefill", str(n_prefill), "--decode", str(n_decode), "--device", device, "--transfer", transfer]
    if device == "cuda":
        argv += ["--num-gpus", str(n_prefill + n_decode)]
    return launcher.with_keys(launcher.plan_commands(parser.parse_args(argv), 8100), KEYS_DIR)


def _splitserve_services(doc: dict) -> dict[str, dict]:
    """The services that run ``splitserve router`` or a worker (not the one-shot ``keys`` service)."""
    return {n: s for n, s in doc["services"].items()
            if s.get("command", [None])[0] == "splitserve" and s["command"][1] in WORKER_COMMANDS | {"router"}}


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
    with pytest.raises(KeyError, match="SPLITSERVE_MODELS_DIR"):
        load_compose(COMPOSE_DIR / "compose.1p1d.yaml", {})
    load_compose(COMPOSE_DIR / "compose.cpu.yaml", {})  # the CPU file needs no variable (the token is a file)
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
    services = {n: s for n, s in _splitserve_services(doc).items()
                if not set(s.get("profiles", [])) or set(s["profiles"]) & set(profiles)}
    router = services.pop("router")["command"]
    for argv in [router] + [s["command"] for s in services.values()]:
        assert argv[0] == "splitserve"
        build_parser(argv[1:]).parse_args(argv[1:])  # raises SystemExit on an unknown flag or bad value
    transfer = _opt(next(iter(services.values()))["command"], "--transfer")
    children = _up_children(device, transfer, n_prefill, n_decode)
    up_by_role = {c.argv[1]: c.argv for c in children}
    # the router also reads the admin token from a secret file (`splitserve up` hands it its token otherwise)
    assert _flags(router) == _flags(up_by_role["router"]) + ["--admin-token-file"]
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
    assert router["ports"] == ["8000:8000"]
    gpu_ids = []
    for name, svc in _splitserve_services(doc).items():
        assert svc["restart"] == "unless-stopped", name
        assert "models:/models:ro" in svc["volumes"], name
        if name != "router":
            assert svc["depends_on"]["router"] == {"condition": "service_started"}
        if "deploy" in svc:
            dev = _gpu_reservation(svc)
            assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
            gpu_ids += dev["device_ids"]
    assert len(gpu_ids) == len(set(gpu_ids))  # one GPU per worker
    assert "models" in doc["volumes"]


def test_npmd_ratio_is_set_by_environment_and_profiles():
    doc = load_compose(COMPOSE_DIR / "compose.npmd.yaml", NPMD_1P3D)
    workers = {n: s for n, s in _splitserve_services(doc).items() if n != "router"}
    assert len(workers) == 8
    roles = {n: s["command"][1] for n, s in workers.items()}
    assert roles == {"gpu0": "prefill", **{f"gpu{i}": "decode" for i in range(1, 8)}}
    assert [_gpu_reservation(workers[f"gpu{i}"])["device_ids"] for i in range(8)] == [[str(i)] for i in range(8)]
    assert all("profiles" not in workers[f"gpu{i}"] for i in (0, 1))
    assert all("gpus8" in workers[f"gpu{i}"]["profiles"] for i in range(2, 8))
    assert all("gpus4" in workers[f"gpu{i}"]["profiles"] for i in (2, 3))


# ---------------------------------------------------------------------------------------------- compose security


def _mounts(svc: dict) -> dict[str, tuple[str, bool]]:
    """A service's volume mounts (short syntax): container path -> (source, read-only)."""
    out = {}
    for entry in svc.get("volumes", []):
        src, dst, *mode = entry.split(":")
        out[dst] = (src, "ro" in (mode[0].split(",") if mode else []))
    return out


def _environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment", {})
    return dict(e.partition("=")[::2] for e in env) if isinstance(env, list) else env


def _keys_service(doc: dict) -> tuple[str, str, str]:
    """The one-shot ``keys`` service: (its name, the volume it writes, the folder its command writes the set into)."""
    (name,) = [n for n, s in doc["services"].items() if "splitserve keys" in " ".join(s.get("command", []))]
    m = re.search(r"splitserve keys (\S+)", " ".join(doc["services"][name]["command"]))
    folder = m.group(1)
    src, read_only = _mounts(doc["services"][name])[folder]
    assert not read_only
    return name, src, folder


def compose_key_problems(doc: dict) -> list[str]:
    """Router and worker services that do not authenticate with the key set the ``keys`` service writes."""
    problems = []
    keys_svc, keys_volume, _ = _keys_service(doc)
    if keys_volume not in doc.get("volumes", {}):
        problems.append(f"{keys_svc} writes into {keys_volume}, which is not a named volume")
    for name, svc in _splitserve_services(doc).items():
        argv = svc["command"]
        keys_dir = _opt(argv, "--keys-dir") if "--keys-dir" in argv else _environment(svc).get("SPLITSERVE_KEYS_DIR")
        if not keys_dir:
            problems.append(f"{name}: no --keys-dir (its control-plane sockets would accept anyone)")
            continue
        mount = _mounts(svc).get(keys_dir)
        if mount != (keys_volume, True):
            problems.append(f"{name}: --keys-dir {keys_dir} is not the {keys_volume} volume mounted read-only "
                            f"({mount})")
        if svc.get("depends_on", {}).get(keys_svc) != {"condition": "service_completed_successfully"}:
            problems.append(f"{name}: does not wait for {keys_svc} to write the key set")
    return problems


def compose_secret_problems(doc: dict) -> list[str]:
    """The admin token must reach the router as a compose secret file, and no token or key as a variable."""
    problems = []
    router = doc["services"]["router"]["command"]
    token_file = _opt(router, "--admin-token-file") if "--admin-token-file" in router else None
    secrets = {s if isinstance(s, str) else s["source"]: s for s in doc["services"]["router"].get("secrets", [])}
    names = {f"/run/secrets/{n}": n for n in secrets}
    if token_file not in names:
        problems.append(f"router: --admin-token-file {token_file} is not one of its secrets {sorted(names)}")
    elif "file" not in doc.get("secrets", {}).get(names[token_file], {}):
        problems.append(f"secret {names[token_file]} is not a file the operator makes")
    for name, svc in doc["services"].items():
        env = _environment(svc)
        for var in SECRET_VARIABLES:
            if var in env:
                problems.append(f"{name}: {var} in its environment (shown by docker inspect)")
        if name != "router" and svc.get("secrets"):
            problems.append(f"{name}: gets secrets {svc['secrets']} it does not need")
    return problems


def _published(entry) -> tuple[str, str]:
    """(host port, container port) of a ``ports`` entry (short or long syntax)."""
    if isinstance(entry, dict):
        return str(entry.get("published", "")), str(entry["target"])
    parts = str(entry).split("/")[0].split(":")
    return (parts[-2] if len(parts) > 1 else ""), parts[-1]


def compose_port_problems(doc: dict) -> list[str]:
    """Anything reachable from outside the compose network other than the router's HTTP port."""
    problems = []
    http = _opt(doc["services"]["router"]["command"], "--port")
    for name, svc in doc["services"].items():
        if svc.get("network_mode") == "host":
            problems.append(f"{name}: network_mode host puts every port on the host's interfaces")
        for entry in svc.get("ports", []):
            if name != "router" or _published(entry)[1] != http:
                problems.append(f"{name}: publishes {entry} (only the router's HTTP port {http} may be published)")
    return problems


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_services_use_the_key_set_secrets_and_publish_only_http(path):
    doc = load_compose(path, BASE_ENV)  # every service, whatever its profile
    assert len(_splitserve_services(doc)) >= 3
    assert compose_key_problems(doc) == []
    assert compose_secret_problems(doc) == []
    assert compose_port_problems(doc) == []
    assert doc["services"]["router"]["ports"] == ["8000:8000"]


def test_compose_checkers_find_broken_files():
    doc = load_compose(COMPOSE_DIR / "compose.npmd.yaml", BASE_ENV)
    bad = copy.deepcopy(doc)  # a worker without keys
    i = bad["services"]["gpu5"]["command"].index("--keys-dir")
    del bad["services"]["gpu5"]["command"][i:i + 2]
    assert any("gpu5: no --keys-dir" in p for p in compose_key_problems(bad))
    bad = copy.deepcopy(doc)  # keys from a writable mount
    bad["services"]["router"]["volumes"] = [v.replace(":ro", "") for v in bad["services"]["router"]["volumes"]]
    assert any(p.startswith("router: --keys-dir") for p in compose_key_problems(bad))
    bad = copy.deepcopy(doc)  # a worker that may start before the key set exists
    bad["services"]["gpu1"]["depends_on"].pop("keys")
    assert any("gpu1: does not wait" in p for p in compose_key_problems(bad))
    bad = copy.deepcopy(doc)  # the admin token as a variable
    bad["services"]["router"]["environment"] = {"SPLITSERVE_ADMIN_TOKEN": "x"}
    assert compose_secret_problems(bad)
    bad = copy.deepcopy(doc)  # the token file not from a secret
    bad["services"]["router"]["secrets"] = []
    assert compose_secret_problems(bad)
    for svc, entry in (("router", "8100:8100"), ("gpu3", "9000:9000"), ("router", {"target": 8100, "published": 8100})):
        bad = copy.deepcopy(doc)
        bad["services"][svc].setdefault("ports", []).append(entry)
        assert compose_port_problems(bad), entry
    bad = copy.deepcopy(doc)
    bad["services"]["gpu0"]["network_mode"] = "host"
    assert compose_port_problems(bad)


def test_keys_service_writes_one_set_and_keeps_it(tmp_path):
    """The ``keys`` service's command (the same in every file), run here with its folder under tmp_path: it writes
    a set both roles load, and a second run (the next ``docker compose up``) leaves that set as it is."""
    commands = {json.dumps(load_compose(p, BASE_ENV)["services"]["keys"]["command"]) for p in COMPOSE_FILES}
    assert len(commands) == 1
    (command,) = map(json.loads, commands)
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o700)  # as the image has it (compose/Dockerfile): a fresh volume starts as that folder
    argv = [a.replace(KEYS_DIR, str(folder)) for a in command]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(argv, check=True, env=env, capture_output=True, timeout=60)
    first = {f: f.read_bytes() for f in folder.rglob("*") if f.is_file()}
    assert curve_keys.load(str(folder), "router").public == curve_keys.load(str(folder), "worker").router_public
    assert (folder / "router.key_secret").stat().st_mode & 0o077 == 0
    subprocess.run(argv, check=True, env=env, capture_output=True, timeout=60)
    assert {f: f.read_bytes() for f in folder.rglob("*") if f.is_file()} == first


def test_dockerfile_exposes_only_http_and_owns_the_keys_folder():
    text = (COMPOSE_DIR / "Dockerfile").read_text()
    assert re.findall(r"^EXPOSE (.*)$", text, re.M) == ["8000"]
    assert f"chown splitserve {KEYS_DIR}" in text and "USER splitserve" in text


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
        extra = ["--admin-token-file"] if name == "splitserve-router" else []
        assert _flags(argv) == _flags(children[argv[1]]) + extra
        assert _opt(argv, "--keys-dir") == KEYS_DIR
        if name != "splitserve-router":
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert _opt(argv, "--router-addr") == "tcp://splitserve-control:8100"


# ---------------------------------------------------------------------------------------------- kubernetes security


def _k8s_list() -> list[dict]:
    return [doc for _, doc in _k8s_docs()]


def _pods(docs: list[dict]) -> dict[str, dict]:
    """Deployment name -> its pod template."""
    return {d["metadata"]["name"]: d["spec"]["template"] for d in docs if d["kind"] == "Deployment"}


def _command(template: dict) -> list[str]:
    (container,) = template["spec"]["containers"]
    return container["command"]


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector {selector}: only matchLabels is understood here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _container_ports(template: dict) -> dict[str, int]:
    (container,) = template["spec"]["containers"]
    return {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}


def _rule_ports(rule: dict, named: dict[str, int]) -> set[int] | None:
    """The TCP ports a NetworkPolicy ingress rule opens on a pod (``None``: every port)."""
    if not rule.get("ports"):
        return None
    out: set[int] = set()
    for p in rule["ports"]:
        if p.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in p:
            return None
        port = named.get(p["port"], p["port"]) if isinstance(p["port"], str) else p["port"]
        out |= set(range(port, p.get("endPort", port) + 1))
    return out


def _rule_sources(rule: dict, pods: dict[str, dict]) -> set[str] | None:
    """The SplitServe pods an ingress rule admits (``None``: anyone, from any namespace or address)."""
    if not rule.get("from"):
        return None
    out: set[str] = set()
    for peer in rule["from"]:
        if set(peer) != {"podSelector"}:  # ipBlock or namespaceSelector: sources outside this deployment
            return None
        out |= {n for n, tpl in pods.items() if _selects(peer["podSelector"], tpl["metadata"]["labels"])}
    return out


def network_policy_problems(docs: list[dict]) -> list[str]:
    """What the NetworkPolicies let through besides HTTP from anywhere to the router, the control port from worker
    pods, and any worker port from worker pods; and what they block that SplitServe needs."""
    pods = _pods(docs)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    workers = {n for n, tpl in pods.items() if _command(tpl)[1] in WORKER_COMMANDS}
    (router,) = [n for n, tpl in pods.items() if _command(tpl)[1] == "router"]
    http, control = (int(_opt(_command(pods[router]), f)) for f in ("--port", "--control-port"))
    problems = []
    for name, tpl in pods.items():
        selecting = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                     and _selects(p["spec"]["podSelector"], tpl["metadata"]["labels"])]
        if not selecting:
            problems.append(f"{name}: no NetworkPolicy selects it, so it accepts every connection")
        named = _container_ports(tpl)
        rules = [(_rule_ports(r, named), _rule_sources(r, pods), p["metadata"]["name"])
                 for p in selecting for r in p["spec"].get("ingress") or []]
        reach_control = set()
        for ports, sources, policy in rules:
            if name == router and sources is None and ports is not None and ports <= {http}:
                continue  # the HTTP API, open to all
            if sources is None:
                what = "every port" if ports is None else sorted(ports)
                problems.append(f"{policy}: admits anyone to {name} on {what}")
            elif not sources <= workers:
                problems.append(f"{policy}: admits {sorted(sources - workers)} to {name}")
            elif name == router and (ports is None or ports - {control}):
                problems.append(f"{policy}: opens {name} ports other than HTTP and control to workers")
            elif ports is None or control in ports:
                reach_control |= sources
        if name == router:
            if not any(s is None and (ports is None or http in ports) for ports, s, _ in rules):
                problems.append(f"{name}: the HTTP port {http} is not open to clients")
            if reach_control != workers:
                problems.append(f"{name}: workers {sorted(workers - reach_control)} cannot reach the control port "
                                f"{control}")
        elif name in workers:
            admitted = set().union(*[s for ports, s, _ in rules if ports is None and s is not None])
            if admitted != workers:
                problems.append(f"{name}: workers {sorted(workers - admitted)} cannot reach its peer and KV ports")
    return problems


def service_problems(docs: list[dict]) -> list[str]:
    """Services: only the HTTP port may leave the cluster, and the workers' --router-addr is a Service on control."""
    pods = _pods(docs)
    (router,) = [n for n, tpl in pods.items() if _command(tpl)[1] == "router"]
    router_tpl = pods[router]
    named = _container_ports(router_tpl)
    http = int(_opt(_command(router_tpl), "--port"))
    control = int(_opt(_command(router_tpl), "--control-port"))
    problems, control_services = [], set()
    for svc in (d for d in docs if d["kind"] == "Service"):
        spec, name = svc["spec"], svc["metadata"]["name"]
        if not _selects({"matchLabels": spec.get("selector", {})}, router_tpl["metadata"]["labels"]):
            continue
        external = spec.get("type", "ClusterIP") != "ClusterIP" or spec.get("externalIPs")
        for port in spec.get("ports", []):
            target = port.get("targetPort", port["port"])
            target = named.get(target, target)
            if target == control:
                if external or name == "splitserve-router":
                    problems.append(f"Service {name} exposes the control port {control}")
                control_services.add(f"tcp://{name}:{port['port']}")
            elif target != http:
                problems.append(f"Service {name} exposes port {target}")
    for name, tpl in pods.items():
        if name != router and _opt(_command(tpl), "--router-addr") not in control_services:
            problems.append(f"{name}: --router-addr {_opt(_command(tpl), '--router-addr')} is no control Service")
    return problems


_FROM_FILE = re.compile(r"--from-file=([\w.]+)=\./splitserve-keys/([\w./]+)")


def _documented_secret() -> dict[str, str]:
    """Secret key -> file of a ``splitserve keys`` set, from the ``kubectl create secret`` steps in the docs."""
    found = {}
    for doc in (COMPOSE_DIR / "README.md", K8S_DIR / "config.yaml", COMPOSE_DIR.parent / "docs" / "security.md"):
        mapping = dict(_FROM_FILE.findall(doc.read_text()))
        assert mapping, f"{doc} shows no `kubectl create secret generic splitserve-keys --from-file=...`"
        found[doc.name] = mapping
    assert len({json.dumps(m, sort_keys=True) for m in found.values()}) == 1, found
    return next(iter(found.values()))


def _secret_volume(template: dict, mount_dir: str) -> dict | None:
    (container,) = template["spec"]["containers"]
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == mount_dir and m.get("readOnly")]
    if len(mounts) != 1:
        return None
    volumes = [v for v in template["spec"].get("volumes", []) if v["name"] == mounts[0]["name"]]
    return volumes[0].get("secret") if len(volumes) == 1 else None


def secret_problems(docs: list[dict]) -> list[str]:
    """Every pod mounts the key set read-only where its --keys-dir points, laid out for its role and readable by its
    user, without the other role's secret key; the admin token is a mounted file, no secret is a variable."""
    problems = []
    for name, tpl in _pods(docs).items():
        argv = _command(tpl)
        role = "router" if argv[1] == "router" else "worker"
        spec = tpl["spec"]
        if "--keys-dir" not in argv:
            problems.append(f"{name}: no --keys-dir")
            continue
        secret = _secret_volume(tpl, _opt(argv, "--keys-dir"))
        if secret is None or secret.get("secretName") != "splitserve-keys":
            problems.append(f"{name}: --keys-dir {_opt(argv, '--keys-dir')} is no read-only mount of splitserve-keys")
            continue
        paths = {i["path"] for i in secret.get("items", [])}
        if paths != {f"{role}.key_secret", "public/router.key", "public/worker.key"}:
            problems.append(f"{name}: key files {sorted(paths)} are not the {role}'s set")
        mode = secret.get("defaultMode", 0o644)
        if not (mode & 0o004 or (mode & 0o040 and spec.get("securityContext", {}).get("fsGroup"))):
            problems.append(f"{name}: its user cannot read the key files (mode {mode:o}, no fsGroup)")
        if role == "router":
            token = _opt(argv, "--admin-token-file") if "--admin-token-file" in argv else ""
            admin = _secret_volume(tpl, os.path.dirname(token))
            if admin is None or os.path.basename(token) not in {i["path"] for i in admin.get("items", [])}:
                problems.append(f"{name}: --admin-token-file {token!r} is not a file of a mounted Secret")
        for container in spec["containers"]:
            for var in container.get("env", []):
                if var["name"] in SECRET_VARIABLES:
                    problems.append(f"{name}: {var['name']} in its environment")
    return problems


def test_k8s_network_policies_services_and_secrets():
    docs = _k8s_list()
    assert sum(d["kind"] == "NetworkPolicy" for d in docs) >= 1
    assert network_policy_problems(docs) == []
    assert service_problems(docs) == []
    assert secret_problems(docs) == []
    (public,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "splitserve-router"]
    assert [p["port"] for p in public["spec"]["ports"]] == [8000]


def _find(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_k8s_checkers_find_broken_manifests():
    docs = _k8s_list()

    def mutate(change):
        bad = copy.deepcopy(docs)
        change(bad)
        return bad

    def router_rule(bad, port):
        rules = _find(bad, "NetworkPolicy", "splitserve-router")["spec"]["ingress"]
        return next(r for r in rules if any(p["port"] == port for p in r["ports"]))

    # control port open to anyone / to another namespace / to the router's own label
    assert network_policy_problems(mutate(lambda b: router_rule(b, 8100).pop("from")))
    assert network_policy_problems(mutate(lambda b: router_rule(b, 8100)["from"].append({"namespaceSelector": {}})))
    assert network_policy_problems(mutate(
        lambda b: router_rule(b, 8100)["from"][0]["podSelector"]["matchLabels"].pop("splitserve/worker")))
    # workers' ports open to anyone, or closed to each other
    assert network_policy_problems(mutate(
        lambda b: _find(b, "NetworkPolicy", "splitserve-workers")["spec"]["ingress"][0].pop("from")))
    assert network_policy_problems(mutate(
        lambda b: _find(b, "NetworkPolicy", "splitserve-workers")["spec"].update(ingress=[])))
    # a pod no policy selects
    assert network_policy_problems(mutate(lambda b: b.remove(_find(b, "NetworkPolicy", "splitserve-workers"))
                                          or b.remove(_find(b, "NetworkPolicy", "splitserve-default-deny"))))
    # the control port back on the public Service, or on a LoadBalancer
    assert service_problems(mutate(lambda b: _find(b, "Service", "splitserve-router")["spec"]["ports"].append(
        {"name": "control", "port": 8100, "targetPort": "control"})))
    assert service_problems(mutate(lambda b: _find(b, "Service", "splitserve-control")["spec"].update(
        type="LoadBalancer")))
    # keys: missing, writable, the other role's secret key, unreadable; the admin token as a variable
    dep = lambda b, n: _find(b, "Deployment", n)["spec"]["template"]["spec"]  # noqa: E731
    assert secret_problems(mutate(lambda b: dep(b, "splitserve-decode")["volumes"].remove(
        next(v for v in dep(b, "splitserve-decode")["volumes"] if v["name"] == "keys"))))
    assert secret_problems(mutate(lambda b: next(m for m in dep(b, "splitserve-prefill")["containers"][0][
        "volumeMounts"] if m["name"] == "keys").pop("readOnly")))
    assert secret_problems(mutate(lambda b: next(
        v for v in dep(b, "splitserve-prefill")["volumes"] if v["name"] == "keys")["secret"]["items"].append(
        {"key": "router.key_secret", "path": "router.key_secret"})))
    assert secret_problems(mutate(lambda b: dep(b, "splitserve-router")["securityContext"].pop("fsGroup")))
    token_var = {"name": "SPLITSERVE_ADMIN_TOKEN",
                 "valueFrom": {"secretKeyRef": {"name": "splitserve-admin", "key": "token"}}}
    assert secret_problems(mutate(
        lambda b: dep(b, "splitserve-router")["containers"][0].setdefault("env", []).append(token_var)))


def test_k8s_secret_from_documented_steps_loads_in_every_pod(tmp_path):
    """The Secret as the docs create it from a ``splitserve keys`` set, projected into each pod as its ``items`` say
    (the way the kubelet lays it out): each role loads its own key pair and both public keys of the set."""
    source = tmp_path / "splitserve-keys"
    curve_keys.write_keys(str(source))
    secret = {key: (source / path).read_bytes() for key, path in _documented_secret().items()}
    assert set(secret) == {"router.key_secret", "worker.key_secret", "router.key", "worker.key"}
    router_public = curve_keys.load(str(source), "router").public
    worker_public = curve_keys.load(str(source), "worker").public
    for name, tpl in _pods(_k8s_list()).items():
        argv = _command(tpl)
        role = "router" if argv[1] == "router" else "worker"
        pod_dir = tmp_path / name
        for item in _secret_volume(tpl, _opt(argv, "--keys-dir"))["items"]:
            (pod_dir / item["path"]).parent.mkdir(parents=True, exist_ok=True)
            (pod_dir / item["path"]).write_bytes(secret[item["key"]])
        loaded = curve_keys.load(str(pod_dir), role)
        assert loaded.public == (router_public if role == "router" else worker_public), name
        assert (loaded.router_public, loaded.worker_public) == (router_public, worker_public), name


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
    (addresses localized; the mounted key set and admin token file under tmp_path, the key set written by the
    ``keys`` service's command), serve completions, answer bench serve and take the admin token from its file;
    SIGTERM stops all of them."""
    doc = load_compose(COMPOSE_DIR / "compose.cpu.yaml", BASE_ENV)
    http = str(_free_port())
    ports = {"8000": http, "8100": str(_free_port())}
    hosts = set(doc["services"]) | {"0.0.0.0"}
    keys_dir, token_file = tmp_path / "keys", tmp_path / "admin_token"
    keys_dir.mkdir(mode=0o700)
    token_file.write_text("compose-test-admin-token\n")
    files = {KEYS_DIR: str(keys_dir), "/run/secrets/admin_token": str(token_file)}
    env_path = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    keys_cmd = [a.replace(KEYS_DIR, str(keys_dir)) for a in doc["services"]["keys"]["command"]]
    subprocess.run(keys_cmd, check=True, env={**os.environ, **env_path}, capture_output=True, timeout=60)
    procs = []
    try:
        for name, svc in _splitserve_services(doc).items():  # router first, as compose's depends_on orders them
            argv = [files.get(a, a) for a in _localize(svc["command"], hosts, ports)]
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
        admin = f"{url}/admin/workers"
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(urllib.request.Request(admin, headers={"Authorization": "Bearer wrong"}), timeout=10)
        assert denied.value.code == 401
        req = urllib.request.Request(admin, headers={"Authorization": "Bearer compose-test-admin-token"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
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
