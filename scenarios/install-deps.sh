#!/usr/bin/env bash
# Installs what rkel's tests need on a fresh Debian 12 machine, as root: the Debian packages the
# local testbed runs on (sshd, Docker Engine, etcd, a registry) and a virtualenv with rkel and its
# test dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(docker.io openssh-server etcd-server etcd-client docker-registry apache2-utils busybox-static iproute2 iptables openssl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# Debian's packages start their own daemons; the testbed runs its own per host instead, and
# the machine-wide ones are not needed (they are left as the package set them up).

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
