"""The rankside image for the tests: built once per content, run as Kubernetes runs it.

Every flag this machine needs beyond a stock podman is here, each with why.
"""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
from pathlib import Path

from system_tools import require_tool

ROOT = Path(__file__).resolve().parent.parent

# Global podman flags. runc: the crun that podman prefers is not installed
# here; cgroupfs: there is no systemd to delegate cgroups to podman.
ENGINE = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
# Raising a limit is not allowed on this machine, so containers get the limits
# it has (podman's defaults would raise nproc and nofile and fail).
LIMITS = ["--ulimit", "nproc=1000:1000", "--ulimit", f"nofile={_soft}:{_hard}"]
# The host's network: no container network stack (netavark, slirp4netns) here.
NETWORK = ["--network", "host"]
# pip inside the build verifies PyPI against the machine's CA bundle.
BUILD = [*NETWORK, *LIMITS, "-v", "/etc/ssl/certs/ca-certificates.crt:"
         "/etc/ssl/certs/ca-certificates.crt:ro"]  # fmt: skip
# How deploy/kubernetes runs the sidecar container: read-only root, uid
# 10001, no capabilities, no privilege escalation.
# podman's --read-only still mounts writable tmpfs on /tmp, /var/tmp and /run;
# --read-only-tmpfs=false makes the root as read-only as Kubernetes does.
AS_KUBERNETES = ["--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL",
                 "--security-opt", "no-new-privileges", "--user", "10001:10001"]  # fmt: skip
UID = 10001


def content_tag() -> str:
    """``localhost/rankside:<hash>`` of everything the image is built from."""
    digest = hashlib.sha256()
    files = [ROOT / "deploy" / "Dockerfile", ROOT / "pyproject.toml", ROOT / "README.md"]
    for package in ("sidecar", "worker_hooks"):
        files += sorted(p for p in (ROOT / package).rglob("*") if p.is_file()
                        and "__pycache__" not in p.parts)  # fmt: skip
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return f"localhost/rankside:{digest.hexdigest()[:16]}"


def image() -> str:
    """The image of the current sources, built now unless it exists already."""
    require_tool("podman")
    require_tool("mmdebstrap")
    tag = content_tag()
    exists = subprocess.run([*ENGINE, "image", "exists", tag], check=False)
    if exists.returncode != 0:
        env = {
            **os.environ,
            "CONTAINER_ENGINE": "podman",
            "RANKSIDE_ENGINE_FLAGS": " ".join(ENGINE[1:]),
            "RANKSIDE_BUILD_FLAGS": " ".join(BUILD),
            # This machine reaches Debian's mirrors but no container registry.
            "RANKSIDE_BASE": "debootstrap",
        }
        subprocess.run([str(ROOT / "deploy" / "build-image.sh"), tag], check=True, env=env,
                       timeout=900, stdout=subprocess.DEVNULL)  # fmt: skip
    return tag
