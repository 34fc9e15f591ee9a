"""Byte-identity check for planner optimisations: the plans of a few large clusters, as hashes.

Run it with `--write FILE` before changing lifecycle/plan.py or lifecycle/desired.py and with
`--check FILE` after: every plan (`Plan.to_dict()` as canonical JSON), the Desired fingerprint
and every spec hash must be the same. The cases: a fresh 300-node cluster, its upgrade from
the state a real journaled apply left, and a mixed change (upgrade, nodes added and removed,
an etcd member leaving and one joining, labels, add-ons), plus the teardown plan.

    .venv/bin/python bench/plan_golden.py --write /tmp/plans-before.json
    .venv/bin/python bench/plan_golden.py --check /tmp/plans-before.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lifecycle.addons import compile_addons
from lifecycle.config.model import ClusterConfig, Node, Taint, UpgradeStrategy
from lifecycle.desired import compile_desired
from lifecycle.hosts.simulated import SimulatedCerts, SimWorld
from lifecycle.plan import diff, restrict, teardown
from lifecycle.runner import apply_plan, current_state
from lifecycle.spec import NodeRef, canonical_json, sha256_hex
from store import Store

OLD, NEW = "v1.30.5-rancher1-1", "v1.31.1-rancher1-1"


def node(i: int, role: tuple[str, ...], **kw: object) -> Node:
    return Node(address=f"10.{i // 250}.{i % 250}.1", user="rkel", hostname_override=f"n{i:04d}",
                role=role, **kw)  # type: ignore[arg-type]


def cluster(size: int, version: str = OLD) -> ClusterConfig:
    nodes = tuple(node(i, ("controlplane", "etcd") if i < 3 else ("worker",)) for i in range(size))
    return ClusterConfig(nodes=nodes, kubernetes_version=version,
                         upgrade_strategy=UpgradeStrategy(max_unavailable_worker="10%", drain=True))


def mixed(size: int) -> ClusterConfig:
    """Upgrade; n0002 leaves (an etcd member), n0003 gains etcd, the last 10 leave, 10 join,
    some workers get labels and taints."""
    base = cluster(size, NEW)
    nodes = [n for n in base.nodes if n.name != "n0002"][: size - 11]
    nodes[2] = node(3, ("etcd", "worker"))
    for k in range(5, 15):
        nodes[k] = node(k + 1, ("worker",), labels={"zone": f"z{k % 3}"},
                        taints=(Taint("dedicated", "db", "NoSchedule"),))
    nodes += [node(size + k, ("worker",)) for k in range(10)]
    return replace(base, nodes=tuple(nodes))


def digest(value: object) -> str:
    """Of the JSON text and of the repr: the repr also tells tuples from lists and keeps the
    order of dict keys, which JSON with sorted keys does not."""
    return sha256_hex(canonical_json(value))[:32] + sha256_hex(repr(value))[:32]


def cases(size: int) -> dict[str, str]:
    out: dict[str, str] = {}
    config = cluster(size)
    desired = compile_desired(config)
    out["desired.fingerprint"] = desired.fingerprint
    out["spec hashes"] = digest([[s.hash for s in n.services] for n in desired.nodes])
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "golden.rkel.db")
        fresh = diff(current_state(store), desired)
        out["fresh"] = digest(fresh.to_dict())
        out["fresh restricted"] = digest(restrict(fresh, ("etcd",)).to_dict())
        apply_plan(store, SimWorld().backend(), fresh, SimulatedCerts(), command="golden",
                   desired=desired)
        current = current_state(store)
        out["current.fingerprint"] = current.fingerprint
        upgraded = compile_desired(cluster(size, NEW))
        out["upgrade"] = digest(diff(current, upgraded).to_dict())
        change = mixed(size)
        addons = compile_addons(change, Path(tmp))
        out["mixed"] = digest(diff(current, compile_desired(change), addons).to_dict())
        refs = tuple(NodeRef(n.name, n.address, n.internal, n.port, n.user, n.role)
                     for n in change.nodes)
        out["teardown"] = digest(teardown(current, refs, "local").to_dict())
        store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path)
    group.add_argument("--check", type=Path)
    parser.add_argument("--size", type=int, default=300)
    args = parser.parse_args()
    got = cases(args.size)
    if args.write:
        args.write.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(got)} digests to {args.write}")
        return
    want = json.loads(args.check.read_text())
    bad = sorted(k for k in want if want[k] != got.get(k))
    for key in sorted(want):
        print(f"{'SAME' if key not in bad else 'DIFFERENT':9} {key}")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
