"""The deployment files in deploy/ agree with each other and with the gateway.

No Docker engine or cluster is needed: the YAML is parsed and cross-checked (probes,
ports, mounts, Secret/ConfigMap references, grace periods), the policies the manifests
ship are validated with the gateway's own loader, and the images' ENTRYPOINT + CMD,
HEALTHCHECK script and .dockerignore rules are exercised here, directly.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import http.server
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from gateway.config.loader import load_policy_text
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.gpu"]
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
NAMESPACE = "llm-gateway"
SUBPROCESS_TIMEOUT_S = 30


# ------------------------------------------------------------------------------ helpers


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml_docs(path: Path) -> list[Any]:
    return list(_parsed(path, path.stat().st_mtime_ns))


@functools.cache
def _parsed(path: Path, _mtime: int) -> tuple[Any, ...]:
    with path.open(encoding="utf-8") as f:
        return tuple(doc for doc in yaml.load_all(f, Loader=_Loader) if doc is not None)


def _k8s_manifest_files() -> list[Path]:
    """What `kubectl apply -k` should apply: every manifest but the kustomization and examples."""
    return sorted(
        p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml" and not p.name.endswith(".example.yaml")
    )


def _k8s_objects(include_examples: bool = False) -> list[dict[str, Any]]:
    files = _k8s_manifest_files()
    if include_examples:
        files += sorted(K8S.glob("*.example.yaml"))
    return [doc for path in files for doc in _yaml_docs(path)]


def _one(kind: str, name: str | None = None, objects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [
        o for o in (objects or _k8s_objects()) if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _gateway_deployment() -> dict[str, Any]:
    return _one("Deployment", "llm-gateway")


def _gateway_container(deployment: dict[str, Any] | None = None) -> dict[str, Any]:
    containers = (deployment or _gateway_deployment())["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "gateway")


def _flag(args: list[str], name: str) -> str:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in an argument list."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def _without(args: list[str], *flags: str) -> list[str]:
    """The argument list less the given ``--flag VALUE`` pairs."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif arg.split("=", 1)[0] not in flags:
            out.append(arg)
    return out


def _with_flags(args: list[str], values: Mapping[str, str]) -> list[str]:
    """The argument list with each ``--flag VALUE`` of ``values`` given that value instead."""
    out = list(args)
    for i, arg in enumerate(args[:-1]):
        if arg in values:
            out[i + 1] = values[arg]
    return out


def _resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def _drain_seconds() -> int:
    """The server's drain after SIGTERM: ``serve --drain-s`` (ends streams in-band) plus the 5 s
    before the server kills what is left (uvicorn's timeout_graceful_shutdown, granian's
    workers_kill_timeout), as gateway/cli/serve.py configures them."""
    from gateway.drain import DEFAULT_DRAIN_S

    source = (ROOT / "gateway" / "cli" / "serve.py").read_text()
    assert "kill_after_s=args.drain_s + 5" in source
    assert (
        "timeout_graceful_shutdown=int(kill_after_s)" in source and "workers_kill_timeout=int(kill_after_s)" in source
    )
    return int(DEFAULT_DRAIN_S + 5)


def _secret_values(name: str) -> dict[str, str]:
    secret = _one("Secret", name, _k8s_objects(include_examples=True))
    return {**secret.get("stringData", {}), **{k: "(base64)" for k in secret.get("data", {})}}


def _container_environ(
    container: dict[str, Any], objects: list[dict[str, Any]], *, optional: bool = True
) -> dict[str, str]:
    """The environment a container gets, from literal values, ConfigMaps and the example Secrets;
    without ``optional``, less the Secret keys it may start without."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_one("ConfigMap", source["configMapRef"]["name"], objects)["data"])
        if "secretRef" in source:
            env.update(_secret_values(source["secretRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            if optional or not ref.get("optional", False):
                env[var["name"]] = _secret_values(ref["name"])[ref["key"]]
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = _one("ConfigMap", ref["name"], objects)["data"][ref["key"]]
    return env


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


# What .env.example leaves blank for a secret of the user's own, which compose will not start without.
_FILLED_BY_THE_USER = {"GATEWAY_CACHE_SALT_KEY": "5f" * 32}


def _dot_env() -> dict[str, str]:
    """deploy/.env as a user makes it: .env.example with its blank secrets filled in."""
    return {**_env_example(), **_FILLED_BY_THE_USER}


_COMPOSE_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def _interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """docker compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} substitution."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        current = env.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return arg if current is None else current
        if op in (":?", "?"):
            assert current, f"compose requires {name}: {arg}"
        return current or ""

    return _COMPOSE_VAR.sub(one, value)


def _compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    (doc,) = _yaml_docs(COMPOSE)
    compose: dict[str, Any] = _interpolate(doc, _dot_env() if env is None else env)
    return compose


class _Dockerfile:
    def __init__(self, path: Path) -> None:
        self.path = path
        text = re.sub(r"\\\n", " ", path.read_text())  # join continuation lines
        self.instructions: list[tuple[str, str]] = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keyword, _, rest = line.partition(" ")
                self.instructions.append((keyword.upper(), rest.strip()))

    def all(self, keyword: str) -> list[str]:
        return [rest for k, rest in self.instructions if k == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"{self.path.name} has no {keyword}"
        return found[-1]

    def exec_form(self, keyword: str) -> list[str]:
        value = json.loads(self.last(keyword))
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{keyword} must be exec form"
        return value

    def final_stage(self) -> list[tuple[str, str]]:
        starts = [i for i, (k, _) in enumerate(self.instructions) if k == "FROM"]
        return self.instructions[starts[-1] :]

    def context_copies(self) -> list[tuple[list[str], str]]:
        """(sources, destination) of each COPY from the build context (not --from)."""
        out = []
        for rest in self.all("COPY"):
            words = shlex.split(rest)
            if any(w.startswith("--from") for w in words):
                continue
            words = [w for w in words if not w.startswith("--")]
            out.append((words[:-1], words[-1]))
        return out


def _run_all(commands: list[tuple[list[str], Mapping[str, str]]]) -> list[subprocess.CompletedProcess[str]]:
    """Run the commands side by side (each is mostly interpreter start-up); results in order.

    In an empty folder, as the image's WORKDIR, with this checkout's package first on the path:
    run in the checkout, the image's CMD (no --data-dir) took its ./.gateway, which a `make run`
    holds, and was refused for that (t96)."""
    with tempfile.TemporaryDirectory(prefix="gateway-workdir-") as workdir:
        procs = []
        for argv, env in commands:
            path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
            proc = subprocess.Popen(argv, cwd=workdir, env={**env, "PYTHONPATH": path},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
            procs.append((argv, proc))
        results = []
        for argv, proc in procs:
            try:
                out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            results.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    return results


def _gateway_command(args: list[str], env: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """``python -m gateway ARGS`` as the images' ENTRYPOINT runs it, with this interpreter."""
    entrypoint = _Dockerfile(DEPLOY / "Dockerfile").exec_form("ENTRYPOINT")
    assert entrypoint[0] == "python"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SMALL_MODEL_", "LARGE_MODEL_", "REDIS_"))}
    full_env.update(env or {})
    return [sys.executable, *entrypoint[1:], *args], full_env


def _run_gateway(args: list[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    (result,) = _run_all([_gateway_command(args, env)])
    return result


# ------------------------------------------------------------------------------ all YAML


def _all_yaml_files() -> list[Path]:
    return sorted(p for pattern in ("*.yaml", "*.yml") for p in DEPLOY.rglob(pattern))


@pytest.mark.parametrize("path", _all_yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_in_deploy_parses(path: Path) -> None:
    docs = _yaml_docs(path)
    assert docs, f"{path} holds no YAML document"


def test_k8s_manifests_are_well_formed_and_namespaced() -> None:
    objects = _k8s_objects(include_examples=True)
    assert objects
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind") and obj.get("metadata", {}).get("name"), obj
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"
    assert _one("Namespace", NAMESPACE)


def test_kustomization_lists_exactly_the_k8s_manifests() -> None:
    (kustomization,) = _yaml_docs(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    assert set(listed) == {p.name for p in _k8s_manifest_files()}
    assert not [r for r in listed if r.endswith(".example.yaml")], "example Secrets must never be applied"
    assert kustomization.get("namespace") == NAMESPACE
    image = _gateway_container()["image"].split(":")[0]
    assert image in {i["name"] for i in kustomization.get("images", [])}


# ------------------------------------------------------------------------------ k8s Deployment


def test_probes_point_at_healthz_and_readyz_on_the_port_the_service_targets() -> None:
    deployment = _gateway_deployment()
    container = _gateway_container(deployment)
    service = _one("Service", "llm-gateway")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items(), "the Service does not select the pods"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (service_port,) = service["spec"]["ports"]
    target = _resolve_port(container, service_port["targetPort"])

    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    for kind, probe in probes.items():
        assert _resolve_port(container, probe["port"]) == target, kind

    assert int(_flag(container["args"], "--port")) == target, "the server listens elsewhere"
    assert _flag(container["args"], "--host") == "0.0.0.0"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == target
    assert annotations["prometheus.io/path"] == "/metrics"
    exposed = {int(p.split("/")[0]) for p in _Dockerfile(DEPLOY / "Dockerfile").all("EXPOSE")}
    assert target in exposed


def test_replicas_workers_autoscaler_and_disruption_budget() -> None:
    deployment = _gateway_deployment()
    container = _gateway_container(deployment)
    assert deployment["spec"]["replicas"] >= 2
    assert _flag(container["args"], "--workers") == "2"
    cmd = _Dockerfile(DEPLOY / "Dockerfile").exec_form("CMD")
    assert _without(container["args"], "--workers", "--onnx-threads") == cmd, (
        "the Deployment's args drifted from the CMD"
    )
    assert container["resources"]["requests"]["cpu"], "HPA utilisation needs a CPU request"
    assert container["resources"]["limits"]["memory"]

    hpa = _one("HorizontalPodAutoscaler", "llm-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm-gateway"}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"

    pdb = _one("PodDisruptionBudget", "llm-gateway")
    assert pdb["spec"]["minAvailable"] == 1
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_policies_configmap_is_mounted_as_a_directory_where_policies_points() -> None:
    deployment = _gateway_deployment()
    pod = deployment["spec"]["template"]["spec"]
    container = _gateway_container(deployment)
    policies = PurePosixPath(_flag(container["args"], "--policies"))
    configmap = _one("ConfigMap", "gateway-policies")
    assert policies.name in configmap["data"], "the file --policies names is not a key of the ConfigMap"

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = [
        m
        for m in container["volumeMounts"]
        if volumes[m["name"]].get("configMap", {}).get("name") == "gateway-policies"
    ]
    assert len(mounts) == 1
    (mount,) = mounts
    assert "subPath" not in mount and "subPathExpr" not in mount, "subPath mounts never receive ConfigMap updates"
    assert PurePosixPath(mount["mountPath"]) == policies.parent
    assert "items" not in volumes[mount["name"]]["configMap"] or any(
        i["key"] == policies.name and i["path"] == policies.name for i in volumes[mount["name"]]["configMap"]["items"]
    )
    for c in pod["containers"]:  # no ConfigMap anywhere is mounted with subPath
        for m in c.get("volumeMounts", []):
            if "configMap" in volumes[m["name"]]:
                assert "subPath" not in m, f"{c['name']} mounts {m['name']} with subPath"


def test_env_references_only_secrets_and_configmaps_that_exist() -> None:
    objects = _k8s_objects(include_examples=True)
    defined = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    for container in (
        _gateway_deployment()["spec"]["template"]["spec"]["containers"]
        + _one("StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]
    ):
        seen: list[str] = []
        for var in container.get("env", []):
            for ref_kind, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                ref = var.get("valueFrom", {}).get(ref_kind)
                if ref:
                    obj = defined.get((kind, ref["name"]))
                    assert obj is not None, f"{container['name']}: {var['name']} refers to missing {kind} {ref['name']}"
                    keys = {*obj.get("data", {}), *obj.get("stringData", {})}
                    assert ref["key"] in keys, f"{kind} {ref['name']} has no key {ref['key']}"
            for used in re.findall(r"\$\((\w+)\)", var.get("value", "")):
                assert used in seen, f"{var['name']} uses $({used}) before it is defined"
            seen.append(var["name"])
        for arg in container.get("args", []):
            for used in re.findall(r"\$\((\w+)\)", arg):
                assert used in seen, f"{container['name']} args use $({used}), which is not in its env"
        for source in container.get("envFrom", []):
            for ref_kind, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                if ref_kind in source:
                    assert (kind, source[ref_kind]["name"]) in defined, f"missing {kind} {source[ref_kind]['name']}"


def test_deploy_readme_puts_no_key_on_a_command_line() -> None:
    """A key in a `kubectl exec` command line lands in the API server's audit log and the shell's
    history (t117): the README's commands read it inside the container, from stdin."""
    text = (DEPLOY / "README.md").read_text()
    code = re.findall(r"```\w*\n(.*?)```", text, re.DOTALL) + re.findall(r"`([^`\n]+)`", text)
    assert any("kubectl" in snippet for snippet in code)
    for snippet in code:
        assert not re.search(r"Bearer [<$\w]|x-api-key: ?[<$\w]", snippet, re.IGNORECASE), snippet


class _NotReady(http.server.BaseHTTPRequestHandler):
    """/readyz of a pod that lost Redis: 503, and the JSON that says why."""

    def do_GET(self) -> None:
        body = json.dumps({"ready": False, "redis": "down", "auth": self.headers.get("Authorization")}).encode()
        self.send_response(503 if self.path == "/readyz" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_deploy_readme_readyz_commands_show_why_a_pod_is_not_ready() -> None:
    """t192 #7: the README's /readyz commands used urlopen(...).read(), which raises HTTPError on
    a 503: the JSON saying why the pod is not ready was never shown. Each is run here, as the
    pod would run it, against a /readyz that answers 503."""
    text = (DEPLOY / "README.md").read_text()
    commands = re.findall(r"kubectl [^`\n]*exec [^`\n]*-- python -c \"([^\"]*/readyz[^\"]*)\"", text)
    assert len(commands) == 2, commands
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotReady)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for code in commands:
            assert "127.0.0.1:8000" in code, code
            local = code.replace("127.0.0.1:8000", f"127.0.0.1:{server.server_address[1]}")
            run = subprocess.run([sys.executable, "-c", local], input="the-admin-key\n", capture_output=True,
                                 text=True, timeout=SUBPROCESS_TIMEOUT_S)  # fmt: skip
            assert run.returncode == 0 and "503" in run.stdout, run.stdout + run.stderr
            shown = json.loads(run.stdout.split(" ", 1)[1])
            assert shown["redis"] == "down"
            assert shown["auth"] == ("Bearer the-admin-key" if "stdin" in code else None)
    finally:
        server.shutdown()
        server.server_close()


def test_example_secret_holds_placeholders_only() -> None:
    for path in K8S.glob("*.example.yaml"):
        for doc in _yaml_docs(path):
            assert doc["kind"] == "Secret"
            assert "data" not in doc, "base64 data in an example hides what it is"
            for key, value in doc["stringData"].items():
                assert "<" in value and ">" in value, f"{path.name}: {key} does not look like a placeholder"


def test_grace_period_covers_prestop_and_drain() -> None:
    pod = _gateway_deployment()["spec"]["template"]["spec"]
    pre_stop = _gateway_container()["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep_s = int(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        match = re.search(r"\bsleep\s+(\d+)", " ".join(command))
        assert match, f"preStop does not sleep: {command}"
        sleep_s = int(match.group(1))
    assert sleep_s >= 5, "too short for endpoint removal to propagate"
    assert pod["terminationGracePeriodSeconds"] > sleep_s + _drain_seconds()


def _under(path: str, folders: list[str]) -> bool:
    return any(PurePosixPath(path).is_relative_to(PurePosixPath(f)) for f in folders)


def test_multi_worker_data_dir_is_writable_under_a_read_only_root() -> None:
    """`serve --workers N>1` writes per-worker metric files into --data-dir (default ./.gateway,
    i.e. the image's root-owned WORKDIR): it must name a writable mount instead."""
    pod = _gateway_deployment()["spec"]["template"]["spec"]
    container = _gateway_container()
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [m["mountPath"] for m in container["volumeMounts"] if "emptyDir" in volumes[m["name"]]]
    gateway = _compose()["services"]["gateway"]
    assert gateway["read_only"] is True
    for args, mounts in ((container["args"], writable), (gateway["command"], gateway["tmpfs"])):
        if int(_flag(args, "--workers")) > 1:
            assert _under(_flag(args, "--data-dir"), mounts), (args, mounts)
    # t192 #7: a plain `docker run` kept the policy last accepted in a fresh temporary folder at
    # each start, so a restarted container had none. The CMD names the one Compose and the
    # Deployment do, under HOME=/tmp, the folder the images leave writable.
    for dockerfile in DOCKERFILES:
        d = _Dockerfile(dockerfile)
        env = " ".join(rest for k, rest in d.final_stage() if k == "ENV")
        data_dir = _flag(d.exec_form("CMD"), "--data-dir")
        assert "HOME=/tmp" in env and _under(data_dir, ["/tmp"]), dockerfile.name
        assert data_dir == _flag(container["args"], "--data-dir") == _flag(gateway["command"], "--data-dir")


def test_the_deployment_sizes_onnx_threads_to_its_cpu_request() -> None:
    """With no CPU limit the gateway sees the node's cores: left to itself each worker would run up to
    8 onnxruntime threads per model on a big node, not the ~2 cores a pod is said to use (t117)."""
    container = _gateway_container()
    args = container["args"]
    cpu = str(container["resources"]["requests"]["cpu"])
    request = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    threads = int(_flag(args, "--workers")) * int(_flag(args, "--onnx-threads"))
    assert threads <= 2 * request, f"{threads} onnxruntime threads per model against a {cpu}-core request"


def test_images_get_the_classifier_from_the_package_they_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """The artifacts are package data of gateway.classifier: the wheel the builder installs carries
    them, and the gateway's default finds them there (tests/e2e/test_wheel_install.py installs one)."""
    import tomllib

    from gateway.settings import DEFAULT_ROUTER_ARTIFACTS, Settings

    monkeypatch.delenv("GATEWAY_ROUTER_ARTIFACTS", raising=False)
    packaged = ROOT / "gateway" / "classifier" / "artifacts"
    assert Path(Settings.from_env().router_artifacts) == Path(DEFAULT_ROUTER_ARTIFACTS) == packaged
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "gateway.classifier"
    ]
    for artifact in ("config.json", "tokenizer.json", "router.int8.onnx"):
        assert (packaged / artifact).is_file(), artifact
        assert any(fnmatch.fnmatch(f"artifacts/{artifact}", glob) for glob in globs), f"{artifact} is not package data"
    for dockerfile in DOCKERFILES:
        d = _Dockerfile(dockerfile)
        assert (["gateway/"], "./gateway/") in d.context_copies(), dockerfile.name
        env = dict(
            item.split("=", 1) for rest in (r for k, r in d.final_stage() if k == "ENV") for item in shlex.split(rest)
        )
        assert "GATEWAY_ROUTER_ARTIFACTS" not in env, f"{dockerfile.name}: the package's own copy is the one to load"
        assert "DEFAULT_ROUTER_ARTIFACTS" in " ".join(d.all("RUN")), f"{dockerfile.name}: the build does not check it"
    monkeypatch.setenv("GATEWAY_ROUTER_ARTIFACTS", "/elsewhere/artifacts")  # still the override
    assert Settings.from_env().router_artifacts == "/elsewhere/artifacts"


def test_pod_runs_non_root_with_a_read_only_root_and_a_writable_tmp() -> None:
    pod = _gateway_deployment()["spec"]["template"]["spec"]
    container = _gateway_container()
    user = _Dockerfile(DEPLOY / "Dockerfile").last("USER").split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user != "0"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and "emptyDir" in volumes[tmp[0]["name"]]


def test_redis_url_names_the_redis_service() -> None:
    objects = _k8s_objects(include_examples=True)
    env = _container_environ(_gateway_container(), objects)
    url = env["REDIS_URL"]
    match = re.fullmatch(r"rediss?://:([^@]+)@([^:/]+):(\d+)/\d+", url)
    assert match, url
    host, port = match.group(2), int(match.group(3))
    service_name, *rest = host.split(".")
    assert rest[:1] in ([], [NAMESPACE])
    service = _one("Service", service_name)
    assert port in {p["port"] for p in service["spec"]["ports"]}
    statefulset = _one("StatefulSet", "redis")
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["image"].startswith("redis:8")
    assert _one("Service", statefulset["spec"]["serviceName"])["spec"]["clusterIP"] == "None"


def _redis_bytes(value: str) -> int:
    """A Kubernetes quantity (2Gi) or a redis.conf size (1152mb: both count in powers of 1024) in bytes."""
    match = re.fullmatch(r"(\d+)([kmg])(?:i|b)", value, re.IGNORECASE)
    assert match, value
    return int(match[1]) << 10 * " kmg".index(match[2].lower())


_FAKE_REDIS_CLI = """#!/bin/sh
# redis-cli ping: the reply (or connection error) the test sets, on the stream it names.
if [ "$REDIS_CLI_STREAM" = stderr ]; then echo "$REDIS_CLI_REPLY" >&2; else echo "$REDIS_CLI_REPLY"; fi
"""


def test_redis_leaves_room_for_its_forks_and_liveness_waits_out_a_load(tmp_path: Path) -> None:
    """t192 #2: maxmemory was 75 % of the 2Gi limit with AOF on: an AOF rewrite or RDB save forks,
    and the copy-on-write of pages the cache writes meanwhile (with fragmentation and client
    buffers) could pass the limit, an OOM kill turning every gateway pod unready. And liveness
    failed while Redis answered LOADING, so a big AOF reloading restart-looped the pod."""
    container = _one("StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    maxmemory = _redis_bytes(_flag(container["args"], "--maxmemory"))
    limit = _redis_bytes(container["resources"]["limits"]["memory"])
    assert maxmemory <= 0.6 * limit, f"maxmemory is {maxmemory / limit:.0%} of the memory limit"
    assert _flag(container["args"], "--maxmemory-policy") == "volatile-ttl"

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "redis-cli").write_text(_FAKE_REDIS_CLI)
    (bin_dir / "redis-cli").chmod(0o755)
    replies = {
        "PONG": (True, True),
        "LOADING Redis is loading the dataset in memory": (False, True),
        "Could not connect to Redis at 127.0.0.1:6379: Connection refused": (False, False),
        "NOAUTH Authentication required.": (False, False),
        "MASTERDOWN Link with MASTER is down": (False, False),
    }
    for probe, ready_or_live in (("readinessProbe", 0), ("livenessProbe", 1)):
        command = container[probe]["exec"]["command"]
        for reply, expected in replies.items():
            for stream in ("stdout",) if reply == "PONG" else ("stdout", "stderr"):  # where an error may go
                env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                       "REDIS_CLI_REPLY": reply, "REDIS_CLI_STREAM": stream}  # fmt: skip
                run = subprocess.run(command, env=env, capture_output=True, timeout=SUBPROCESS_TIMEOUT_S)
                assert (run.returncode == 0) is expected[ready_or_live], (probe, reply, stream)


def test_deploy_readme_sizes_a_pods_memory_by_the_requests_it_holds() -> None:
    """t192 #3: the 2Gi limit is reached by ~100-120 requests of near-maximum bodies in flight in a
    pod, and the README said only that memory grows with concurrency. It gives the measured
    figures for the Deployment's limit and body cap, and caps whose worst case fits the limit."""
    container = _gateway_container()
    limit = container["resources"]["limits"]["memory"]
    policy = yaml.safe_load(_one("ConfigMap", "gateway-policies")["data"]["policies.yaml"])
    max_body_mib = policy.get("limits", {}).get("max_body_bytes", 4 * 2**20) / 2**20
    note = re.search(
        r"\* Memory grows with the requests in flight.*?(?=\n\* )", (DEPLOY / "README.md").read_text(), re.S
    )
    assert note, "deploy/README.md's scaling notes say nothing of memory"
    text = " ".join(note[0].split())
    assert f"reach the {limit} limit" in text and f"`limits.max_body_bytes`, {max_body_mib:g} MiB" in text
    assert "`max_concurrent`" in text and "`--workers`" in text
    caps = re.search(r"caps adding up to at most (\d+) \((\d+) a pod", text)
    assert caps, text
    workers = int(_flag(container["args"], "--workers"))
    assert int(caps[2]) == workers * int(caps[1])
    assert int(caps[2]) * 17 + 600 <= _redis_bytes(limit) >> 20, "the advised caps do not fit the limit"


def test_deploy_files_say_the_counters_have_no_ttl() -> None:
    """t192 #4: compose.yaml, redis.yaml and deploy/README said the rate-limit and usage counters
    expire in months, so volatile-ttl would evict them after the cache. They have no TTL (the
    main README says so): never evicted, and once only they are left Redis refuses writes."""
    assert "no\nlimit or budget counter has a TTL" in (ROOT / "README.md").read_text()
    for path in (COMPOSE, K8S / "redis.yaml", DEPLOY / "README.md"):
        text = " ".join(re.sub(r"^\s*#", "", path.read_text(), flags=re.M).split())
        assert "volatile-ttl" in text, path.name
        assert not re.search(r"counters[^.]*\bmonths\b", text), f"{path.name}: the counters do not expire"
        assert "never evicted" in text and "refuses writes" in text, path.name


def test_configmap_policy_validates_with_the_gateway_loader() -> None:
    objects = _k8s_objects(include_examples=True)
    environ = _container_environ(_gateway_container(), objects)
    text = _one("ConfigMap", "gateway-policies")["data"]["policies.yaml"]
    try:
        loaded = load_policy_text(text, source="k8s/configmap-policies.yaml", environ=environ)
    except ConfigError as exc:
        pytest.fail("\n".join(exc.problems))
    policy = loaded.policy
    assert {"auto", "fast", "best"} <= set(policy.routes)
    assert policy.auth.mode == "keys", "a cluster deployment must require keys"
    assert not loaded.warnings, loaded.warnings
    # Both upstreams are vLLM, as in compose (*_MODEL_CONTINUES, *_MODEL_CACHE_SALT true):
    # an Anthropic prefill is continued, and tenants are kept apart in the prefix cache.
    for name in (policy.pair.small, policy.pair.large):
        model = policy.models[name]
        assert model.continue_final_message, f"{name}: vLLM continues a final assistant message"
        assert model.tenant_cache_salt, f"{name}: vLLM salts its prefix cache per tenant"
    # Nor with the optional upstream keys left out (an in-cluster vLLM without --api-key): the
    # tenants' cache salt is then keyed on GATEWAY_CACHE_SALT_KEY, not on the models' names.
    bare = _container_environ(_gateway_container(), objects, optional=False)
    assert "SMALL_MODEL_API_KEY" not in bare and "LARGE_MODEL_API_KEY" not in bare
    unkeyed = load_policy_text(text, source="k8s/configmap-policies.yaml", environ=bare)
    assert not [w for w in unkeyed.warnings if "tenant_cache_salt" in w], unkeyed.warnings
    # Without the Deployment's environment the policy must NOT load: proves it is what supplies it.
    with pytest.raises(ConfigError):
        load_policy_text(text, environ={})


# ------------------------------------------------------------------------------ images


def test_dockerfiles_are_multi_stage_non_root_and_share_entrypoint_and_cmd() -> None:
    parsed = [_Dockerfile(p) for p in DOCKERFILES]
    for d in parsed:
        assert len(d.all("FROM")) >= 2, f"{d.path.name} is not multi-stage"
        final = d.final_stage()
        assert any(k == "COPY" and "--from=builder" in rest for k, rest in final), "runtime copies nothing from builder"
        user = d.last("USER").split(":")[0]
        assert user.isdigit() and user != "0", "USER must be a numeric non-root id (runAsNonRoot checks it)"
        assert d.last("EXPOSE") == "8000"
        assert d.last("STOPSIGNAL") == "SIGTERM"
        env = " ".join(rest for k, rest in final if k == "ENV")
        assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
        assert d.exec_form("ENTRYPOINT") == ["python", "-m", "gateway"]
        assert any(src == ["gateway/"] for src, _ in d.context_copies()), "package (and its classifier) not copied"
    assert parsed[0].exec_form("CMD") == parsed[1].exec_form("CMD")
    assert parsed[0].exec_form("CMD") == [
        "serve", "--host", "0.0.0.0", "--port", "8000", "--policies", "/etc/gateway/policies.yaml",
        "--data-dir", "/tmp/gateway",
    ]  # fmt: skip


def _arg_assignment(rest: str) -> tuple[str, str]:
    """NAME and value of a Dockerfile `ARG NAME=value` (the value unquoted)."""
    match = re.match(r"(\w+)=\"?([^\"]*)\"?$", rest)
    assert match is not None, f"ARG {rest!r} is not NAME=value"
    return match[1], match[2]


def test_gpu_image_is_cuda_12_with_cudnn_9_and_a_matching_onnxruntime() -> None:
    d = _Dockerfile(DEPLOY / "Dockerfile.gpu")
    args = dict(_arg_assignment(rest) for rest in d.all("ARG") if "=" in rest)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", args["CUDA_IMAGE"])
    assert d.final_stage()[0] == ("FROM", "${CUDA_IMAGE} AS runtime")
    # onnxruntime-gpu >= 1.27 on PyPI is built for CUDA 13: it would fall back to the CPU here.
    spec = args["ORT_GPU_SPEC"]
    assert spec.startswith("onnxruntime-gpu") and "<1.27" in spec.replace(" ", "")


def test_cpu_image_pins_one_onnxruntime() -> None:
    """t117: `onnxruntime>=1.20` took whatever PyPI had on the day of the build. The pin is not
    held to the version this venv resolved: a new onnxruntime-gpu on PyPI would turn CI red."""
    (spec,) = re.findall(
        r"pip install (?:-c \S+ )?\"(onnxruntime[^\"]*)\"", " ".join(_Dockerfile(DEPLOY / "Dockerfile").all("RUN"))
    )
    assert re.fullmatch(r"onnxruntime==\d+\.\d+\.\d+", spec), f"{spec} is not one version"


CONSTRAINTS = DEPLOY / "constraints.txt"
_OWN_ONNXRUNTIME = {"onnxruntime", "onnxruntime-gpu"}  # each Dockerfile pins its own build


def _pinned() -> dict[str, str]:
    """deploy/constraints.txt as {canonical name: version}; every line ``name==version``."""
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==([\w.+!-]+)", line.strip())
            assert match, f"constraints.txt: {line!r} is not name==version"
            name = canonicalize_name(match[1])
            assert name not in pins, f"constraints.txt pins {name} twice"
            pins[name] = match[2]
    return pins


def _direct_dependencies() -> list[str]:
    import tomllib

    dependencies: list[str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dependencies


def _image_requirements() -> dict[str, Any]:
    """What `pip install <the gateway's wheel>` installs here: pyproject's dependencies and theirs,
    as this interpreter has them installed ({canonical name: the Requirement that pulled it in})."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, Any] = {}
    read: set[tuple[str, str]] = set()
    todo = [(Requirement(r), "") for r in _direct_dependencies()]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        found.setdefault(name, requirement)
        for wanted in {"", *requirement.extras} - {e for n, e in read if n == name}:
            read.add((name, wanted))
            todo += [(Requirement(r), wanted) for r in metadata.requires(requirement.name) or []]
    return found


def test_the_images_install_the_versions_the_tests_ran() -> None:
    """t192 #6: only onnxruntime was pinned; everything else resolved on the day of the build,
    though gateway/cli/serve.py subclasses uvicorn's internals (tested with 0.55.0). Every package
    the images' `pip install` brings in is pinned in deploy/constraints.txt, and both use it."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    pins = _pinned()
    wanted = _image_requirements()
    assert not set(pins) & _OWN_ONNXRUNTIME, "the Dockerfiles pin onnxruntime themselves (the GPU one below 1.27)"
    # every direct dependency pinned; a transitive one a fresh venv newly resolves (a new release that
    # brought a new dependency) is not held against a CI run, which did not choose it
    direct = {canonicalize_name(Requirement(r).name) for r in _direct_dependencies()}
    missing = sorted(direct - set(pins) - _OWN_ONNXRUNTIME)
    assert not missing, f"deploy/constraints.txt does not pin {missing}: regenerate it (its header says how)"
    for name, requirement in wanted.items():
        if name in pins:
            assert pins[name] in SpecifierSet(str(requirement.specifier)), f"{name}=={pins[name]}: not {requirement}"
    for dockerfile in DOCKERFILES:
        d = _Dockerfile(dockerfile)
        (copied,) = [dest for sources, dest in d.context_copies() if sources == ["deploy/constraints.txt"]]
        installs = [c for run in d.all("RUN") for c in re.split(r"\s*&&\s*", run) if re.match(r"pip install\b", c)]
        assert installs, dockerfile.name
        for command in installs:
            words = shlex.split(command)
            assert "-c" in words and PurePosixPath(words[words.index("-c") + 1]).name == "constraints.txt", (
                f"{dockerfile.name}: {command}"
            )
            assert words[words.index("-c") + 1] in (copied, str(PurePosixPath(copied) / "constraints.txt"))


def test_image_entrypoint_and_cmd_work_when_run_directly(tmp_path: Path) -> None:
    cmd = _Dockerfile(DEPLOY / "Dockerfile").exec_form("CMD")
    # ENTRYPOINT + CMD exactly, with --policies aimed at a file that is not there: the
    # parser must accept every argument and the server must stop at loading the policy
    # (exit 2), before it would start Redis or listen.
    missing = tmp_path / "absent" / "policies.yaml"
    swapped = _with_flags(cmd, {"--policies": str(missing), "--data-dir": str(tmp_path / "data")})
    help_run, run = _run_all([_gateway_command([cmd[0], "--help"]), _gateway_command(swapped)])
    assert help_run.returncode == 0, help_run.stderr
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert str(missing) in run.stderr and "invalid" in run.stderr
    for flag in (a for a in cmd if a.startswith("--")):
        assert flag in help_run.stdout


def test_the_image_cmd_refuses_the_open_default_policy_on_every_interface(tmp_path: Path) -> None:
    """The image's own policy (the repository's, as shipped) has auth off; on 0.0.0.0 anyone reaching
    the port would spend the upstreams' keys. Compose publishes on loopback and allows it explicitly.
    An open policy of the tests' own: the checkout's is the user's to turn auth on in (t96)."""
    cmd = _Dockerfile(DEPLOY / "Dockerfile").exec_form("CMD")
    policy = tmp_path / "policies.yaml"
    policy.write_text(
        "pair: {small: small, large: large}\nmodels:\n"
        "  small: {base_url: '${SMALL_MODEL_URL}', price: {input: 0, output: 0}, tier: small}\n"
        "  large: {base_url: '${LARGE_MODEL_URL}', price: {input: 0, output: 0}, tier: large}\n"
        "routes: {fast: {model: small}}\nauth: {mode: none}\n"
    )
    swapped = _with_flags(cmd, {"--policies": str(policy), "--data-dir": str(tmp_path / "data")})
    env = {
        "GATEWAY_ALLOW_NO_AUTH": "",
        "SMALL_MODEL_URL": "http://127.0.0.1:9/v1",
        "LARGE_MODEL_URL": "http://127.0.0.1:9/v1",
    }
    (refused,) = _run_all([_gateway_command(swapped, env)])
    assert refused.returncode == 2 and "auth is off and --host 0.0.0.0" in refused.stderr
    gateway = _compose()["services"]["gateway"]
    assert all(str(port).startswith("127.0.0.1:") for port in gateway["ports"])
    assert str(gateway["environment"]["GATEWAY_ALLOW_NO_AUTH"]) == "1"


def test_compose_and_k8s_arguments_parse_as_the_image_cmd_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """compose's `command:` and the Deployment's `args:` replace the image's CMD: the
    gateway's own parser must accept them (parsed in-process; the server is not started)."""
    import gateway.cli
    import gateway.cli.serve

    parsed: list[argparse.Namespace] = []

    def run(args: argparse.Namespace) -> int:
        parsed.append(args)
        return 0

    monkeypatch.setattr(gateway.cli.serve, "run", run)
    cmd = _Dockerfile(DEPLOY / "Dockerfile").exec_form("CMD")
    for args in (cmd, _compose()["services"]["gateway"]["command"], _gateway_container()["args"]):
        assert gateway.cli.main(args) == 0
        namespace = parsed.pop()
        assert namespace.policies == _flag(args, "--policies")
        assert namespace.host == "0.0.0.0" and namespace.port == 8000
        assert namespace.server in ("uvicorn", "granian")  # both drain for --drain-s + 5 s (_drain_seconds)
        if "--workers" in args:
            assert namespace.workers == 2
        if "--onnx-threads" in args:
            assert namespace.onnx_threads == int(_flag(args, "--onnx-threads"))


def test_entrypoint_check_accepts_the_k8s_and_compose_policies(tmp_path: Path) -> None:
    container = _gateway_container()
    k8s_env = _container_environ(container, _k8s_objects(include_examples=True))
    folder = tmp_path / "etc-gateway"
    folder.mkdir()
    k8s_policy = folder / PurePosixPath(_flag(container["args"], "--policies")).name
    k8s_policy.write_text(_one("ConfigMap", "gateway-policies")["data"]["policies.yaml"])

    gateway = _compose()["services"]["gateway"]
    (mount,) = [v for v in gateway["volumes"] if v["target"] == "/etc/gateway"]
    compose_policy = (DEPLOY / mount["source"]).resolve() / PurePosixPath(_flag(gateway["command"], "--policies")).name

    nothing_in_force = ["--data-dir", str(tmp_path / "no-data-dir")]  # not a `make run`'s .gateway in ROOT
    runs = _run_all([
        _gateway_command(["check", str(k8s_policy), *nothing_in_force], k8s_env),
        _gateway_command(["check", str(compose_policy), *nothing_in_force], gateway["environment"]),
    ])  # fmt: skip
    for run in runs:
        assert run.returncode == 0, run.args[-1] + "\n" + run.stderr
        assert ": ok (version" in run.stdout


def _healthcheck_script() -> Path:
    d = _Dockerfile(DEPLOY / "Dockerfile")
    healthcheck = d.last("HEALTHCHECK")
    assert healthcheck.startswith("--") and " CMD " in f" {healthcheck}"
    command = json.loads(healthcheck.split("CMD", 1)[1])
    assert command[0] == "python"
    script = command[1]
    for sources, destination in d.context_copies():
        if destination == script:
            (source,) = sources
            return ROOT / source
    raise AssertionError(f"{script} is not COPYed into the image")


class _Status(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_healthcheck_is_valid_python_and_reports_health() -> None:
    script = _healthcheck_script()
    compile(script.read_text(), str(script), "exec")
    image_check = json.loads(_Dockerfile(DEPLOY / "Dockerfile").last("HEALTHCHECK").split("CMD", 1)[1])
    assert _compose()["services"]["gateway"]["healthcheck"]["test"] == ["CMD", *image_check]

    servers = []
    for status in (200, 503):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Status,), {"status": status}))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    urls = [f"http://127.0.0.1:{srv.server_address[1]}/healthz" for srv in servers]
    urls.append(f"http://127.0.0.1:{closed}/healthz")
    # A proxy in the environment must not capture the loopback check.
    proxy = {"HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}
    try:
        runs = _run_all([
            ([sys.executable, str(script)], {**os.environ, **proxy, "GATEWAY_HEALTHCHECK_URL": url}) for url in urls
        ])  # fmt: skip
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()
    assert [r.returncode for r in runs] == [0, 1, 1], [r.stderr for r in runs]


def _dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            else:
                part = re.search(r"[^*]*\*?|.", pattern[i:]).group(0)  # type: ignore[union-attr]
                translated = fnmatch.translate(part)[4:-3]  # strip (?s: ... )\Z
                regex += translated.replace(".*", "[^/]*")
                i += len(part)
        rules.append((include, re.compile(regex + r"\Z")))
    return rules


def _ignored(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for include, regex in rules:
        if any(regex.match(p) for p in prefixes):
            ignored = not include
    return ignored


def test_dockerignore_lets_in_what_the_images_copy_and_nothing_secret() -> None:
    canonical = (DEPLOY / ".dockerignore").read_bytes()
    for dockerfile in DOCKERFILES:  # BuildKit uses <Dockerfile>.dockerignore next to the Dockerfile
        companion = dockerfile.with_name(dockerfile.name + ".dockerignore")
        assert companion.read_bytes() == canonical, f"{companion.name} differs from deploy/.dockerignore"
    for named in re.findall(r"\b(?:tests|gateway|deploy)/[\w/.-]+\.py\b", canonical.decode()):
        assert (ROOT / named).is_file(), f".dockerignore names {named}, which does not exist"
    rules = _dockerignore_rules(DEPLOY / ".dockerignore")
    for dockerfile in DOCKERFILES:
        for sources, _ in _Dockerfile(dockerfile).context_copies():
            for source in sources:
                source = source.rstrip("/")
                assert not _ignored(rules, source), f"{dockerfile.name} copies {source}, which .dockerignore drops"
                assert not _ignored(rules, f"{source}/x.py") or not (ROOT / source).is_dir()
    assert not _ignored(rules, "gateway/classifier/runtime.py")
    assert not _ignored(rules, "gateway/classifier/artifacts/router.int8.onnx")
    leaks = (".env", "deploy/.env", ".venv/bin/python", ".git/config", "bench-results/x.json",
             "gateway/__pycache__/cli.cpython-311.pyc", "router_models/train.py", "tests/e2e/test_deploy.py")  # fmt: skip
    for leak in leaks:
        assert _ignored(rules, leak), f"{leak} would be sent to the builder"


def test_artifact_and_policy_sources_exist() -> None:
    for dockerfile in DOCKERFILES:
        for sources, _ in _Dockerfile(dockerfile).context_copies():
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
    assert (ROOT / "gateway" / "classifier" / "artifacts" / "config.json").is_file(), "the classifier is not committed"


# ------------------------------------------------------------------------------ compose


def test_compose_services_dependencies_and_healthchecks() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"gateway", "redis", "vllm-large", "vllm-small"} <= set(services)
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            assert condition["condition"] == "service_healthy"
    assert services["redis"]["image"].startswith("redis:8")
    assert services["gateway"]["depends_on"]["redis"].get("required", True) is True
    gateway = services["gateway"]
    assert gateway["build"]["dockerfile"] in {str(p.relative_to(ROOT)) for p in DOCKERFILES}
    assert (DEPLOY / gateway["build"]["context"]).resolve() == ROOT
    assert _flag(gateway["command"], "--workers") == "2"
    cmd = _Dockerfile(DEPLOY / "Dockerfile").exec_form("CMD")
    assert _without(gateway["command"], "--workers") == cmd, "compose's command drifted from the CMD"


def test_compose_mounts_the_repo_policy_folder_where_policies_points() -> None:
    gateway = _compose()["services"]["gateway"]
    policies = PurePosixPath(_flag(gateway["command"], "--policies"))
    mounts = [v for v in gateway["volumes"] if isinstance(v, dict) and v.get("type") == "bind"]
    assert not [v for v in gateway["volumes"] if isinstance(v, str) and policies.name in v], "single-file mount"
    (mount,) = [m for m in mounts if PurePosixPath(m["target"]) == policies.parent]
    source = (DEPLOY / mount["source"]).resolve()
    assert source.is_dir(), "a folder is mounted, not the file (hot reload needs the folder)"
    assert (source / policies.name).is_file(), f"{source / policies.name} does not exist in the repo"
    assert mount.get("read_only") is True


def test_compose_env_points_at_the_vllm_services_and_their_names() -> None:
    services = _compose()["services"]
    env = services["gateway"]["environment"]
    for role in ("small", "large"):
        url = env[f"{role.upper()}_MODEL_URL"]
        match = re.fullmatch(r"http://([\w-]+):(\d+)/v1", url)
        assert match, url
        server = services[match.group(1)]
        command = server["command"]
        assert int(_flag(command, "--port")) == int(match.group(2))
        assert _flag(command, "--served-model-name") == env[f"{role.upper()}_MODEL_NAME"]
        devices = server["deploy"]["resources"]["reservations"]["devices"]
        assert devices and all("gpu" in d["capabilities"] for d in devices)
    speculative = json.loads(_flag(services["vllm-large"]["command"], "--speculative-config"))
    assert speculative["num_speculative_tokens"] == 5
    assert speculative["model"] == services["vllm-small"]["command"][0], "the draft is the small model"
    redis_url = env["REDIS_URL"]
    assert re.fullmatch(r"redis://:[^@]+@redis:6379/0", redis_url), redis_url


def test_compose_policy_validates_with_the_gateway_loader() -> None:
    gateway = _compose()["services"]["gateway"]
    (mount,) = [v for v in gateway["volumes"] if v["target"] == "/etc/gateway"]
    path = (DEPLOY / mount["source"]).resolve() / "policies.yaml"
    try:
        load_policy_text(path.read_text(), source=str(path), environ=gateway["environment"])
    except ConfigError as exc:
        pytest.fail("\n".join(exc.problems))


def test_env_example_defines_every_required_variable_and_no_secret() -> None:
    example = _env_example()
    required = {m.group(1) for m in _COMPOSE_VAR.finditer(COMPOSE.read_text()) if m.group(2) in (":?", "?")}
    assert required <= {k for k, v in example.items() if v} | set(_FILLED_BY_THE_USER), (
        "a required variable is missing from .env.example"
    )
    lines = ENV_EXAMPLE.read_text().splitlines()
    for key in _FILLED_BY_THE_USER:  # left blank, with how to make one, and compose says it is missing
        (at,) = [i for i, line in enumerate(lines) if line.startswith(f"{key}=")]
        assert example[key] == "" and "openssl rand" in "\n".join(lines[at - 4 : at]), key
        with pytest.raises(AssertionError, match=key):
            _compose(env=example)
    for key, value in example.items():
        if key.endswith(("_API_KEY", "HF_TOKEN")):
            assert value == "", f"{key} must be empty in the example"
        if "PASSWORD" in key:
            assert "change-me" in value
    assert ".env" in (DEPLOY / ".gitignore").read_text().split(), "deploy/.env must stay out of git"
    # Without a .env, compose refuses to start rather than run Redis without a password.
    with pytest.raises(AssertionError, match="REDIS_PASSWORD"):
        _compose(env={})


def test_compose_requires_the_key_of_the_cache_salt_it_turns_on() -> None:
    """t192 #5: .env.example turns tenant_cache_salt on for the vLLM pair with no upstream keys and
    GATEWAY_CACHE_SALT_KEY blank, so the default stack salted each tenant's prefix cache with a
    value anyone who reaches vLLM can compute from the model's name. Kubernetes requires the key;
    compose now refuses to start without it too."""
    example = _env_example()
    assert example["SMALL_MODEL_CACHE_SALT"] == example["LARGE_MODEL_CACHE_SALT"] == "true"
    assert example["SMALL_MODEL_API_KEY"] == example["LARGE_MODEL_API_KEY"] == ""
    with pytest.raises(AssertionError, match="GATEWAY_CACHE_SALT_KEY"):
        _compose(env=example)
    gateway = _compose()["services"]["gateway"]
    assert gateway["environment"]["GATEWAY_CACHE_SALT_KEY"] == _FILLED_BY_THE_USER["GATEWAY_CACHE_SALT_KEY"]
    (mount,) = [v for v in gateway["volumes"] if v["target"] == "/etc/gateway"]
    path = (DEPLOY / mount["source"]).resolve() / PurePosixPath(_flag(gateway["command"], "--policies")).name
    loaded = load_policy_text(path.read_text(), source=str(path), environ=gateway["environment"])
    policy = loaded.policy
    assert all(policy.models[name].tenant_cache_salt for name in (policy.pair.small, policy.pair.large))
    assert not [w for w in loaded.warnings if "tenant_cache_salt" in w], loaded.warnings
    (ref,) = [v for v in _gateway_container()["env"] if v["name"] == "GATEWAY_CACHE_SALT_KEY"]
    assert not ref["valueFrom"]["secretKeyRef"].get("optional", False), "Kubernetes requires it as well"


def _compose_policy(env: Mapping[str, str]) -> Any:
    """The repository's policy as compose's gateway loads it, with compose's environment from ``env``."""
    gateway = _compose(env)["services"]["gateway"]
    (mount,) = [v for v in gateway["volumes"] if v["target"] == "/etc/gateway"]
    path = (DEPLOY / mount["source"]).resolve() / PurePosixPath(_flag(gateway["command"], "--policies")).name
    return load_policy_text(path.read_text(), source=str(path), environ=gateway["environment"]).policy


_HOSTED = {"SMALL_MODEL_URL": "https://api.openai.com/v1", "LARGE_MODEL_URL": "https://api.openai.com/v1"}


def test_compose_sends_vllm_only_fields_only_where_env_example_turns_them_on() -> None:
    """t156 #1: compose defaulted continue_final_message and tenant_cache_salt on for any upstream.
    Pointed at OpenAI as its comments said, every chat request carried `cache_salt` and every
    Anthropic prefill `add_generation_prompt`: 400 "Unrecognized request argument" for both.
    They are off unless .env says otherwise; .env.example turns them on for its vLLM pair."""
    switches = ("SMALL_MODEL_CONTINUES", "LARGE_MODEL_CONTINUES", "SMALL_MODEL_CACHE_SALT", "LARGE_MODEL_CACHE_SALT")

    def chat_models(env: Mapping[str, str]) -> list[Any]:
        policy = _compose_policy(env)
        return [policy.models[name] for name in (policy.pair.small, policy.pair.large)]

    example = _dot_env()
    assert example.get("COMPOSE_PROFILES") == "models"
    assert all(m.continue_final_message and m.tenant_cache_salt for m in chat_models(example)), "vLLM pair"
    # A .env that sets none of them (written before they existed, or with the lines deleted).
    bare = {k: v for k, v in example.items() if k not in switches and k != "COMPOSE_PROFILES"}
    for model in chat_models({**bare, **_HOSTED}):
        assert not model.continue_final_message and not model.tenant_cache_salt, model
    # .env.example's hosted instructions, next to the URL lines, name the four switches.
    lines = ENV_EXAMPLE.read_text().splitlines()
    url_line = next(i for i, line in enumerate(lines) if re.match(r"#\s*LARGE_MODEL_URL=https://", line))
    nearby = "\n".join(lines[url_line - 6 : url_line + 10])
    for switch in switches:
        assert f"{switch}=true" in nearby, f"{switch} is not set beside the hosted URLs"
    assert "false" in nearby and "400" in nearby


def test_k8s_vllm_only_fields_are_set_beside_the_upstream_urls() -> None:
    """t156 #1: the ConfigMap policy hard-coded them on while deploy/README said to edit only the
    URLs for other upstreams. They come from gateway-upstreams, next to the URLs."""
    objects = _k8s_objects(include_examples=True)
    upstreams = _one("ConfigMap", "gateway-upstreams", objects)["data"]
    text = _one("ConfigMap", "gateway-policies", objects)["data"]["policies.yaml"]
    hosted = {
        **_container_environ(_gateway_container(), objects),
        **{k: "false" for k in upstreams if k.endswith(("_CONTINUES", "_CACHE_SALT"))},
    }
    policy = load_policy_text(text, environ=hosted).policy
    for name in (policy.pair.small, policy.pair.large):
        assert not policy.models[name].continue_final_message and not policy.models[name].tenant_cache_salt
    readme = (DEPLOY / "README.md").read_text()
    assert "vLLM-only" in readme and "continue_final_message" in readme and "tenant_cache_salt" in readme


# The policy reads them, compose leaves them out: the images have no simulator, and a container logs to stdout.
_NOT_FOR_COMPOSE = {"SMALL_MODEL_SIMULATED", "LARGE_MODEL_SIMULATED", "GATEWAY_REQUEST_LOG"}


def test_compose_passes_every_variable_its_policy_reads() -> None:
    """t156 #2: EMBEDDING_MODEL_URL / _NAME / _API_KEY never reached the container, so `embed`
    always went to vllm-small, which serves no embeddings (502). Nor may compose pass a
    variable nobody reads (a misspelt name)."""
    gateway = _compose()["services"]["gateway"]
    (mount,) = [v for v in gateway["volumes"] if v["target"] == "/etc/gateway"]
    text = ((DEPLOY / mount["source"]).resolve() / "policies.yaml").read_text()
    policy = yaml.safe_load(text)
    referenced = set(re.findall(r"\$\{(\w+)", json.dumps(policy)))  # in values: not the comments' ${VAR}
    referenced |= {m["api_key_env"] for m in policy["models"].values() if "api_key_env" in m}
    passed = set(gateway["environment"])
    assert not referenced - passed - _NOT_FOR_COMPOSE, "compose does not pass them to the gateway"
    source = "\n".join(p.read_text() for p in (ROOT / "gateway").rglob("*.py"))
    for name in passed - referenced:
        assert f'"{name}"' in source, f"compose passes {name}, which neither the policy nor the gateway reads"
    embedding = {"EMBEDDING_MODEL_URL": "https://api.openai.com/v1", "EMBEDDING_MODEL_NAME": "text-embedding-3-small"}
    embed = _compose_policy({**_dot_env(), **embedding}).models["embed"]
    assert (embed.base_url, embed.upstream_model) == ("https://api.openai.com/v1", "text-embedding-3-small")
    assert (
        "EMBEDDING_MODEL_URL" in ENV_EXAMPLE.read_text() and "EMBEDDING_MODEL_URL" in (DEPLOY / "README.md").read_text()
    )


def test_compose_vllm_servers_split_qwen3_reasoning_off_the_answer() -> None:
    """t156 #6: without a reasoning parser Qwen3's <think>...</think> is in the answer's content
    (cached, and shown to Anthropic clients as text); with it, vLLM answers it as `reasoning`."""
    services = _compose()["services"]
    for name in ("vllm-large", "vllm-small"):
        command = services[name]["command"]
        assert command[0].startswith("Qwen/Qwen3"), command[0]
        assert _flag(command, "--reasoning-parser") == "qwen3", name


def test_every_docker_run_example_mounts_a_policy_or_allows_no_auth() -> None:
    """t156 #3: the image's own policy has auth off and its CMD listens on 0.0.0.0, so a
    `docker run` with env vars alone exits 2."""
    for path in [*DOCKERFILES, DEPLOY / "README.md"]:
        text = re.sub(r"\\\n#?\s*", " ", path.read_text())
        runs = re.findall(r"docker run --.*", text)
        assert runs or (path.suffix == ".md" and not runs), path
        for run in runs:
            if " ... " not in run:  # "the same, with --gpus 1"
                assert "/etc/gateway" in run or "GATEWAY_ALLOW_NO_AUTH=1" in run, f"{path.name}: {run}"
        assert "works with env vars alone" not in text, path.name


def _build_checks(dockerfile: Path) -> list[list[str]]:
    """The `python ... -c CODE` commands the Dockerfile's RUN instructions run, as argument lists."""
    out = []
    for run in _Dockerfile(dockerfile).all("RUN"):
        for command in re.split(r"\s*&&\s*|;\s+(?=python)", run):
            words = shlex.split(command) if re.match(r"python3?\s", command) else []
            if "-c" in words:
                out.append(words)
    return out


def test_the_image_builds_check_the_installed_package_not_the_source_tree(tmp_path: Path) -> None:
    """t156 #4: the checks ran in WORKDIR /src, where `import gateway` finds the copied source
    tree first, so a wheel without the classifier still passed; the cache verifier's artifacts
    were not checked at all. `python -I` leaves the working folder off sys.path."""
    installed = subprocess.run([sys.executable, "-I", "-c", "import gateway"], cwd=tmp_path, capture_output=True)
    if installed.returncode != 0:
        pytest.skip("the gateway is not installed in this interpreter (only on PYTHONPATH)")
    source_tree = tmp_path / "src"
    (source_tree / "gateway").mkdir(parents=True)
    (source_tree / "gateway" / "__init__.py").write_text("raise SystemExit('imported the source tree')\n")
    for dockerfile in DOCKERFILES:
        checks = _build_checks(dockerfile)
        assert checks, dockerfile.name
        for words in checks:
            assert words[1] == "-I", f"{dockerfile.name}: {shlex.join(words)[:80]} runs in the source tree"
        artifacts = [w for w in checks if "DEFAULT_ROUTER_ARTIFACTS" in w[-1]]
        assert len(artifacts) == 1 and "gateway.cache.verifier" in artifacts[0][-1], dockerfile.name
        run = subprocess.run(
            [sys.executable, *artifacts[0][1:]], cwd=source_tree, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stderr
        assert "classifier" in run.stdout and "cache" in run.stdout


_FAKE_VLLM = """#!/usr/bin/env bash
# vllm serve MODEL --served-model-name NAME ...: logs who it is and where, then fails or serves.
echo "$$ ${CUDA_VISIBLE_DEVICES-all} $*" >> "$VLLM_LOG"
case " $* " in *" --served-model-name $VLLM_FAILS "*) sleep 0.5; exit 1 ;; esac
exec sleep 60
"""


@pytest.mark.parametrize("fails", ["large", "small"])
def test_vllm_pair_gateway_mode_gives_each_server_its_gpus_and_stops_both(tmp_path: Path, fails: str) -> None:
    """t156 #5: both servers started on the same GPUs at vLLM's default 0.9 memory share, so the
    large one failed on GPU 0, and the small one, in the background, was left running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text(_FAKE_VLLM)
    (bin_dir / "vllm").chmod(0o755)
    log = tmp_path / "vllm.log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "VLLM_LOG": str(log)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    with (tmp_path / "out.txt").open("w") as out:  # a file, not a pipe: a server left running would hold it open
        script = subprocess.Popen(
            ["bash", str(DEPLOY / "speculative" / "vllm-pair.sh"), "gateway"],
            env={**env, "VLLM_FAILS": fails}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            returncode = script.wait(timeout=SUBPROCESS_TIMEOUT_S)
        finally:
            script.kill()
            script.wait()
            started: dict[str, tuple[int, str]] = {}
            for line in log.read_text().splitlines() if log.exists() else ():
                pid, devices, *argv = line.split()
                started[_flag(argv, "--served-model-name")] = (int(pid), devices)
            left_running = []
            for server_pid, _ in started.values():
                try:
                    os.kill(server_pid, signal.SIGKILL)
                    left_running.append(server_pid)
                except ProcessLookupError:
                    pass
    assert returncode != 0, (tmp_path / "out.txt").read_text()
    assert set(started) == {"small", "large"}
    assert not left_running, f"{fails} failed and the other server was left running"
    small, large = (set(started[name][1].split(",")) for name in ("small", "large"))
    assert "all" not in small | large and not small & large, started
    assert len(large) == 4  # LARGE_TP
