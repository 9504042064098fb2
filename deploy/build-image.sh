#!/usr/bin/env bash
# Build the rankside image: deploy/build-image.sh [TAG]   (make image)
#
# With podman (or docker when podman is absent). PYTHON_IMAGE picks the base
# (default python:3.11-slim from a registry); RANKSIDE_BASE=debootstrap makes
# a Debian bookworm base with mmdebstrap instead, for machines that reach
# Debian's mirrors but no container registry. Extra build flags for this
# machine come in RANKSIDE_BUILD_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-rankside:0.1.0}
engine=${CONTAINER_ENGINE:-$(command -v podman || command -v docker)}
read -r -a extra <<< "${RANKSIDE_BUILD_FLAGS:-}"
read -r -a engine_flags <<< "${RANKSIDE_ENGINE_FLAGS:-}"
base=${PYTHON_IMAGE:-python:3.11-slim}
if [ "${RANKSIDE_BASE:-}" = debootstrap ]; then
  base=localhost/rankside-base:bookworm
  if ! "$engine" "${engine_flags[@]}" image inspect "$base" >/dev/null 2>&1; then
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    mmdebstrap --quiet --variant=minbase \
      --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
      bookworm "$rootfs/rootfs.tar"
    "$engine" "${engine_flags[@]}" import -q "$rootfs/rootfs.tar" "$base" >/dev/null
  fi
fi
"$engine" "${engine_flags[@]}" build -q "${extra[@]}" --build-arg PYTHON_IMAGE="$base" \
  -t "$tag" -f deploy/Dockerfile . >/dev/null
echo "$tag"
