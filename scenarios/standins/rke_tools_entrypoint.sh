#!/bin/sh
# Stand-in for /opt/rke-tools/entrypoint.sh of rancher/rke-tools (tests only; see README.md).
#
# RKE runs kube containers as `/opt/rke-tools/entrypoint.sh <component> ARGS...`, with
# /opt/rke-tools mounted from the service-sidekick container. The real script prepares the node
# (mounts, cgroups, sysctls, cri-dockerd for the kubelet, ...) and then runs `exec "$@"`. This
# one prepares nothing: it logs, then execs the component, which is found on PATH in the
# component's image (e.g. /usr/local/bin/kube-apiserver). POSIX sh (busybox ash).

if [ "$#" -eq 0 ]; then
    echo "usage: $0 <component> [ARGS...]" >&2
    echo "  runs <component> ARGS... (found on PATH); rke-tools entrypoint stand-in" >&2
    exit 2
fi

echo "rke-tools entrypoint (stand-in): starting $1" >&2
if [ "$1" = "kubelet" ] && [ "${RKE_KUBELET_CRIDOCKERD:-}" = "true" ]; then
    echo "rke-tools entrypoint (stand-in): RKE_KUBELET_CRIDOCKERD=true, but cri-dockerd is" \
        "not started by the stand-in (docker is the runtime on the testbed)" >&2
fi
exec "$@"
