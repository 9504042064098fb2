"""deploy/: the image definition and the Kubernetes manifests, checked as files.

Every Kubernetes object validates against the Kubernetes JSON schemas that the
kubernetes-validate package ships (no network). The PyTorchJob custom
resource is not in those schemas: its pod templates validate as core
PodTemplates and the rest is checked structurally. Every pod spec found
anywhere must pass the Pod Security Standards "restricted" profile, with a
read-only root filesystem and resource requests and limits on top.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT
from system_tools import require_tool

from sidecar.cli.main import build_parser
from sidecar.cli.options import config_from_args

DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
KUBE_VERSION = "1.33"  # native sidecars are GA from 1.33 (beta, on by default, from 1.29)
EXAMPLES = ("job", "pytorchjob")

# Pod Security Standards, restricted profile (Kubernetes 1.33).
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml")


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in load(path)]


def pod_specs(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec (a mapping with a ``containers`` list) anywhere in ``node``."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield where, node
            return
        for key, value in node.items():
            yield from pod_specs(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from pod_specs(value, f"{where}[{i}]")


def pod_templates(node: Any) -> Iterator[dict[str, Any]]:
    """Every pod template (a mapping whose ``spec`` is a pod spec) in ``node``."""
    if isinstance(node, dict):
        if isinstance(node.get("spec"), dict) and "containers" in node["spec"]:
            yield node
            return
        for value in node.values():
            yield from pod_templates(value)
    elif isinstance(node, list):
        for value in node:
            yield from pod_templates(value)


def all_pod_specs() -> list[tuple[str, dict[str, Any]]]:
    found = [
        (f"{path.relative_to(ROOT)}:{doc['kind']}{where}", spec)
        for path, doc in all_objects()
        for where, spec in pod_specs(doc)
    ]
    assert found, "no pod specs under deploy/kubernetes"
    return found


def containers_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        *spec.get("initContainers", []),
        *spec["containers"],
        *spec.get("ephemeralContainers", []),
    ]


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """What keeps ``spec`` from the restricted profile (plus our own requirements)."""
    problems: list[str] = []
    pod_sc = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"{field} is set")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        problems.append("hostProcess is set")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']} is of type {sorted(kinds)}")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            problems.append(f"sysctl {sysctl['name']} is not safe")
    if pod_sc.get("runAsUser") == 0:
        problems.append("the pod runs as uid 0")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    pod_nonroot = pod_sc.get("runAsNonRoot")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        problems.append(f"pod seccomp profile is {pod_seccomp}")
    if (pod_sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        problems.append("pod AppArmor profile is Unconfined")
    for container in containers_of(spec):
        name = container["name"]
        sc = container.get("securityContext", {})
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {caps['add']}")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccomp profile is {seccomp}")
        if sc.get("runAsNonRoot", pod_nonroot) is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            problems.append(f"{name}: runs as uid 0")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount is {sc['procMount']}")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            problems.append(f"{name}: AppArmor profile is Unconfined")
        selinux_type = (sc.get("seLinuxOptions") or {}).get("type")
        if selinux_type not in (None, "", "container_t", "container_init_t", "container_kvm_t"):
            problems.append(f"{name}: SELinux type {selinux_type}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{name}: uses a host port")
        # Beyond the profile: what the issue asks of every container.
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: root filesystem is not read-only")
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(resources.get(kind, {})):
                problems.append(f"{name}: no cpu and memory {kind}")
    return problems


def test_manifests_validate_against_kubernetes_schemas() -> None:
    objects = all_objects()
    kinds = sorted(doc["kind"] for _, doc in objects)
    assert kinds == ["Job", "PyTorchJob"], kinds
    for _path, doc in objects:
        if doc["apiVersion"].startswith("kubeflow.org/"):
            continue  # a custom resource: see test_pytorchjob_structure
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    kubernetes_validate.validate(generated_secret(), KUBE_VERSION, strict=True)


def test_pytorchjob_structure() -> None:
    jobs = [doc for _, doc in all_objects() if doc["kind"] == "PyTorchJob"]
    assert len(jobs) == 1
    job = jobs[0]
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    assert set(spec) <= {"pytorchReplicaSpecs", "runPolicy", "nprocPerNode", "elasticPolicy"}
    assert isinstance(spec["nprocPerNode"], str)
    assert set(spec["runPolicy"]) <= {
        "backoffLimit",
        "cleanPodPolicy",
        "activeDeadlineSeconds",
        "ttlSecondsAfterFinished",
        "schedulingPolicy",
        "suspend",
        "managedBy",
    }
    assert spec["runPolicy"]["cleanPodPolicy"] in ("None", "Running", "All")
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1
    for role, replica in replicas.items():
        assert set(replica) == {"replicas", "restartPolicy", "template"}, role
        assert isinstance(replica["replicas"], int) and replica["replicas"] >= 1
        assert replica["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
        # The operator finds the training container by this name.
        assert "pytorch" in [c["name"] for c in replica["template"]["spec"]["containers"]]
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{job['metadata']['name']}-{role.lower()}"},
            "template": replica["template"],
        }
        kubernetes_validate.validate(template, KUBE_VERSION, strict=True)


def test_every_pod_spec_passes_the_restricted_profile() -> None:
    specs = all_pod_specs()
    assert len(specs) == 3  # the Job's, and the PyTorchJob's master and worker
    for where, spec in specs:
        assert restricted_violations(spec) == [], where


def test_restricted_check_catches_violations() -> None:
    spec = all_pod_specs()[0][1]
    bad = yaml.safe_load(yaml.safe_dump(spec))
    bad["hostNetwork"] = True
    bad["securityContext"].pop("runAsNonRoot")
    bad["initContainers"][0]["securityContext"]["capabilities"] = {"add": ["SYS_PTRACE"]}
    bad["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    bad["containers"][0]["securityContext"].pop("readOnlyRootFilesystem")
    bad["containers"][0]["resources"].pop("limits")
    bad["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    problems = "\n".join(restricted_violations(bad))
    for expected in (
        "hostNetwork",
        "volume host",
        "rankside: capabilities do not drop ALL",
        "rankside: adds capabilities",
        "rankside: runAsNonRoot",
        "trainer: allowPrivilegeEscalation",
        "trainer: root filesystem",
        "trainer: no cpu and memory limits",
    ):
        assert expected in problems


def sidecar_of(spec: dict[str, Any]) -> dict[str, Any]:
    (sidecar,) = [c for c in spec.get("initContainers", []) if c["name"] == "rankside"]
    return sidecar


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_native_sidecar_shape() -> None:
    specs = all_pod_specs()
    first = sidecar_of(specs[0][1])
    for where, spec in specs:
        sidecar = sidecar_of(spec)
        assert sidecar == first, f"{where}: the sidecar differs from the others"
        # A native sidecar: an init container that keeps running.
        assert sidecar["restartPolicy"] == "Always"
        # Workers start only once the sidecar is ready, i.e. its socket exists.
        assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
        assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert sidecar["startupProbe"]["periodSeconds"] <= 2
        port = {p["name"]: p["containerPort"] for p in sidecar["ports"]}["rankside"]
        env = env_of(sidecar)
        assert env["RANKSIDE_LISTEN"] == f"0.0.0.0:{port}"
        socket_dir = os.path.dirname(env["RANKSIDE_SOCKET"])
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
        assert "emptyDir" in volumes[mounts[socket_dir]]
        # The token comes from the Secret, mounted read-only.
        token_path = sidecar["args"][sidecar["args"].index("--token-file") + 1]
        token_mount = next(
            m for m in sidecar["volumeMounts"] if token_path.startswith(m["mountPath"] + "/")
        )
        assert token_mount.get("readOnly") is True
        assert volumes[token_mount["name"]]["secret"]["secretName"] == "rankside-token"
        # Every training container sees the socket at the same path.
        for container in spec["containers"]:
            assert env_of(container)["RANKSIDE_SOCKET"] == env["RANKSIDE_SOCKET"]
            assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]}[
                socket_dir
            ] == mounts[socket_dir]
        # Both ends run as the same user: the sidecar accepts its own uid.
        assert "runAsUser" in spec["securityContext"]
        assert "runAsUser" not in sidecar["securityContext"]


def test_sidecar_accepts_the_manifest_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rankside serve`` with the manifest's args and env: a token, a public listen address."""
    sidecar = sidecar_of(all_pod_specs()[0][1])
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o440)
    env = env_of(sidecar)
    env["RANKSIDE_SOCKET"] = str(tmp_path / "rankside.sock")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = [str(token) if a == "/etc/rankside/token" else a for a in sidecar["args"]]
    assert args != sidecar["args"], "the token file path changed: update this test"
    config = config_from_args(build_parser().parse_args(["serve", *args]))
    assert config.listen == "0.0.0.0:9478"
    assert config.token == "s3cret"
    assert not config.metrics_auth  # probes and Prometheus carry no token
    assert config.socket_path == env["RANKSIDE_SOCKET"]


def kustomization(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert data["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert data["kind"] == "Kustomization"
    return data


def generated_secret() -> dict[str, Any]:
    """The Secret that base/'s secretGenerator makes, as kustomize renders it."""
    (generator,) = kustomization(KUBE / "base")["secretGenerator"]
    assert kustomization(KUBE / "base")["generatorOptions"]["disableNameSuffixHash"] is True
    assert generator["files"] == ["token"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": generator["name"]},
        "data": {"token": base64.b64encode(b"example").decode()},
    }


def test_kustomizations_reference_what_exists() -> None:
    assert (KUBE / "base" / ".gitignore").read_text().split() == ["/token"]
    for example in EXAMPLES:
        data = kustomization(KUBE / example)
        resources = data["resources"]
        assert "../base" in resources
        images = set()
        for resource in resources:
            path = (KUBE / example / resource).resolve()
            assert path.exists(), f"{example}: {resource} does not exist"
            if path.is_file():
                images |= {
                    c["image"].rsplit(":", 1)[0]
                    for doc in load(path)
                    for _, spec in pod_specs(doc)
                    for c in containers_of(spec)
                }
        assert {i["name"] for i in data["images"]} == images
        assert all(isinstance(i["newTag"], str) for i in data["images"])


def test_kubectl_kustomize_renders_the_examples(tmp_path: Path) -> None:
    """When kubectl is installed, the real kustomize renders each example as expected."""
    # A skip in CI would hide a broken kustomization: there it must run.
    kubectl = require_tool("kubectl", "install kubectl, which brings kustomize")
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUBE, tree)
    (tree / "base" / "token").write_text("example")
    for example in EXAMPLES:
        out = subprocess.run(
            [kubectl, "kustomize", str(tree / example)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
        by_kind = {d["kind"]: d for d in rendered}
        assert set(by_kind) == {"Secret", "Job" if example == "job" else "PyTorchJob"}
        secret = by_kind.pop("Secret")
        assert base64.b64decode(secret["data"]["token"]) == b"example"
        kubernetes_validate.validate(secret, KUBE_VERSION, strict=True)
        (obj,) = by_kind.values()
        source = next(d for p, d in all_objects() if d["kind"] == obj["kind"])
        assert obj == source


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [
        line.strip()
        for line in re.sub(r"\\\n", " ", text).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    stages = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(stages) == 2, "a build stage and a final stage"
    final = lines[stages[-1] :]
    args = dict(
        line.split(None, 1)[1].split("=", 1)
        for line in lines[: stages[0]]
        if line.startswith("ARG ")
    )
    assert args["PYTHON_IMAGE"].endswith("-slim")
    assert final[0] == "FROM ${PYTHON_IMAGE}"
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert len(users) == 1
    uid = users[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric, non-root user"
    assert 'ENTRYPOINT ["rankside", "serve"]' in final
    final_text = "\n".join(final)
    assert "PYTHONDONTWRITEBYTECODE=1" in final_text
    for tool in ("gcc", "build-essential", "pip install", "apt-get install", "make"):
        assert tool not in final_text, f"{tool} in the final stage"
    assert "COPY --from=build /opt/rankside /opt/rankside" in final
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", ".dockerignore starts from nothing"
    for needed in ("pyproject.toml", "README.md", "sidecar", "worker_hooks"):
        assert f"!{needed}" in ignore
