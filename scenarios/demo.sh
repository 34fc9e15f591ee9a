#!/usr/bin/env bash
# The main job on one Debian 12 machine, as root: build the local testbed (three hosts, each with
# its own sshd and Docker Engine, and a private registry), then let rkel bring up a whole
# Kubernetes cluster on it for real, over SSH as a non-root docker-group user: etcd (real), and
# the Kubernetes components (stand-in processes in images the testbed builds; see README.md),
# then show `rkel status` and `kubectl get nodes` with the admin kubeconfig rkel wrote.
# Run `python3 scenarios/testbed/testbed.py down` to take the testbed away afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scenarios/install-deps.sh
TB=${RKEL_TESTBED_DIR:-/var/lib/rkel-testbed}
.venv/bin/python scenarios/testbed/testbed.py --state-dir "$TB" up 3
WORK=${RKEL_DEMO_DIR:-$TB/demo}
mkdir -p "$WORK"
cp "$TB/cluster.yml" "$WORK/cluster.yml"
.venv/bin/rkel -c "$WORK/cluster.yml" plan
.venv/bin/rkel -c "$WORK/cluster.yml" apply --yes
.venv/bin/rkel -c "$WORK/cluster.yml" status
if command -v kubectl >/dev/null; then
  kubectl --kubeconfig "$WORK/kube_config_cluster.yml" get nodes -o wide
else
  echo "(kubectl is not installed: skipping \`kubectl get nodes\`)"
fi
