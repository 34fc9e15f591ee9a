"""`rkel config`: the cluster.yml generator (as `rke config`), its listings, and that what it
writes is exactly what rkel's own loader reads back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from lifecycle.cli.config_cmd import (
    PLUGINS,
    ConfigDraft,
    NodeDraft,
    draft_from_config,
    render_draft,
)
from lifecycle.config import load_config, load_config_text
from lifecycle.config.model import DEFAULT_KUBERNETES_VERSION
from lifecycle.versions import supported_versions, version_info
from tests.test_cli import no_traceback, rkel


def answers(*lines: str) -> str:
    return "".join(f"{line}\n" for line in lines)


# Cluster name, cluster key, number of hosts; per host: address, port, user, key, cp?, etcd?,
# worker?, hostname, internal address, docker socket; then plugin, version, domain, service
# range, pod range, DNS IP. "" takes the default.
TWO_HOSTS = answers(
    "prod", "/keys/cluster", "2",
    "10.0.0.1", "", "rkel", "", "y", "y", "n", "CP-1", "", "",
    "10.0.0.2", "2222", "admin", "/keys/w", "n", "n", "y", "", "192.168.0.2", "/run/docker.sock",
    "flannel", "v1.31.1-rancher1-1", "", "", "", "",
)


def generate(tmp_path: Path, stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`rkel ARGS` in `tmp_path`, answering its questions with `stdin`."""
    return subprocess.run([sys.executable, "-m", "lifecycle", *args], cwd=tmp_path, input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_answers_become_a_cluster_yml_that_rkel_loads_without_warnings(tmp_path: Path) -> None:
    result = generate(tmp_path, TWO_HOSTS, "config")
    assert result.returncode == 0, result.stderr
    assert "Wrote the cluster to cluster.yml" in result.stdout
    loaded = load_config(tmp_path / "cluster.yml")
    assert loaded.warnings == ()
    c = loaded.config
    assert (c.cluster_name, c.kubernetes_version, c.ssh_key_path, c.network.plugin) == (
        "prod", "v1.31.1-rancher1-1", "/keys/cluster", "flannel")
    cp, worker = c.nodes
    assert (cp.address, cp.port, cp.user, cp.role, cp.name, cp.ssh_key_path) == (
        "10.0.0.1", 22, "rkel", ("controlplane", "etcd"), "cp-1", "")
    assert (worker.address, worker.port, worker.user, worker.role, worker.ssh_key_path,
            worker.internal_address, worker.docker_socket) == (
        "10.0.0.2", 2222, "admin", ("worker",), "/keys/w", "192.168.0.2", "/run/docker.sock")
    assert c.services.kubelet.cluster_dns_server == "10.43.0.10"
    # and `rkel config validate` agrees
    check = rkel("-c", str(tmp_path / "cluster.yml"), "config", "validate")
    assert check.returncode == 0 and "warning" not in check.stdout


def test_a_bad_answer_is_asked_again_with_the_reason(tmp_path: Path) -> None:
    stdin = answers(
        "my cluster", "prod", "", "zero", "2",
        "10.0.0.1", "ssh", "70000", "", "rkel", "", "", "", "", "", "", "",
        "10.0.0.1", "10.0.0.2", "", "rkel", "", "maybe", "n", "n", "n", "n", "n", "y", "", "", "",
        "calico", "canal", "v1.2.3", "", "", "10.43.0.0/99", "", "", "10.99.0.1", "10.43.0.53",
    )
    result = generate(tmp_path, stdin, "config", "--print")
    assert result.returncode == 0, result.stderr
    for reason in ("use letters, digits", "`zero` is not a number of hosts", "`ssh` is not a port",
                   "`70000` is not a port", "10.0.0.1 is already the address of host (1)",
                   "answer y or n", "host (2) needs at least one role",
                   "rkel does not deploy it yet", "rkel knows v1.29.9-rancher1-1",
                   "is not a CIDR range", "10.99.0.1 is not in the service range 10.43.0.0/16"):
        assert reason in result.stderr, reason
    c = load_config_text(result.stdout).config
    assert c.cluster_name == "prod" and [n.address for n in c.nodes] == ["10.0.0.1", "10.0.0.2"]
    assert c.nodes[1].role == ("worker",) and c.network.plugin == "canal"
    assert c.services.kubelet.cluster_dns_server == "10.43.0.53"
    assert not (tmp_path / "cluster.yml").exists()  # --print writes no file
    no_traceback(result)


def test_a_cluster_without_an_etcd_or_controlplane_host_asks_which_host_gets_it(tmp_path: Path) -> None:
    stdin = answers("", "", "2",
                    "10.0.0.1", "", "", "", "n", "n", "y", "", "", "",
                    "10.0.0.2", "", "", "", "n", "n", "y", "", "", "",
                    "3", "2", "2", "", "", "", "", "", "", "")
    result = generate(tmp_path, stdin, "config", "--print")
    assert result.returncode == 0, result.stderr
    assert "No host has the etcd role" in result.stderr
    assert "give a host number from 1 to 2" in result.stderr
    c = load_config_text(result.stdout).config
    assert [n.role for n in c.nodes] == [("worker",), ("controlplane", "etcd", "worker")]


def test_an_existing_file_is_only_replaced_when_confirmed(tmp_path: Path) -> None:
    target = tmp_path / "cluster.yml"
    target.write_text("# mine\n")
    for no in ("n\n", ""):  # "no", and the input ending at the question
        kept = generate(tmp_path, no + TWO_HOSTS, "config")
        assert kept.returncode == 1 and "nothing written" in kept.stderr
        assert target.read_text() == "# mine\n"
    replaced = generate(tmp_path, "y\n" + TWO_HOSTS, "config")
    assert replaced.returncode == 0, replaced.stderr
    assert load_config(target).config.cluster_name == "prod"
    target.write_text("# mine\n")
    forced = generate(tmp_path, TWO_HOSTS, "config", "--force", "--name", "cluster.yml")
    assert forced.returncode == 0 and load_config(target).config.cluster_name == "prod"


def test_input_that_ends_early_writes_nothing(tmp_path: Path) -> None:
    result = generate(tmp_path, answers("prod", "", "2", "10.0.0.1"), "config", "--name", "c.yml")
    assert result.returncode == 1
    assert "input ended before every question was answered" in result.stderr
    assert list(tmp_path.iterdir()) == []
    no_traceback(result)


def test_the_empty_template_names_what_to_fill_in(tmp_path: Path) -> None:
    result = generate(tmp_path, "", "config", "--empty", "--name", "empty.yml")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "empty.yml"
    check = rkel("-c", str(path), "config", "validate")
    assert check.returncode == 2
    assert "has no `address`" in check.stderr and "User for host (1)" in check.stderr
    filled = path.read_text().replace('address: ""', "address: 10.0.0.7").replace(
        'user: ""', "user: rkel")
    loaded = load_config_text(filled)
    assert loaded.warnings == () and loaded.config.nodes[0].address == "10.0.0.7"
    assert loaded.config.kubernetes_version == DEFAULT_KUBERNETES_VERSION
    printed = generate(tmp_path, "", "config", "--empty", "--print")
    assert printed.stdout == path.read_text()


def test_list_versions_and_system_images(tmp_path: Path) -> None:
    listed = rkel("config", "--list-versions")
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == supported_versions()
    assert f"{DEFAULT_KUBERNETES_VERSION}  (default)" in listed.stdout
    data = json.loads(rkel("-o", "json", "config", "--list-versions").stdout)
    assert data == {"versions": supported_versions(), "default": DEFAULT_KUBERNETES_VERSION}
    for version in supported_versions():
        images = rkel("config", "--system-images", "--version", version)
        assert images.returncode == 0
        assert set(images.stdout.split()) == set(version_info(version).images.values())
    assert "rancher/hyperkube:v1.29.9-rancher1" in rkel(
        "config", "--system-images", "--version", "v1.29.9-rancher1-1").stdout
    default = rkel("-o", "json", "config", "--system-images")
    assert json.loads(default.stdout)["version"] == DEFAULT_KUBERNETES_VERSION
    unknown = rkel("config", "--system-images", "--version", "v1.99.0-rancher1-1")
    assert unknown.returncode == 2
    assert "rkel has no data for Kubernetes v1.99.0-rancher1-1" in unknown.stderr
    assert "--list-versions" in unknown.stderr
    no_traceback(unknown)


def test_flags_that_do_not_go_together_are_refused_and_validate_still_works(tmp_path: Path) -> None:
    for args, needle in ((["--version", "v1.30.5-rancher1-1"], "goes with --system-images"),
                         (["--list-versions", "--system-images"], "either"),
                         (["--print", "--name", "x.yml"], "--print writes no file"),
                         (["--name", "x.yml", "validate"], "does not go with `rkel config validate`")):
        result = rkel("config", *args)
        assert result.returncode == 2 and needle in result.stderr, (args, result.stderr)
    path = tmp_path / "cluster.yml"
    path.write_text("nodes: [{address: 10.0.0.1, user: rkel, role: [controlplane, etcd, worker]}]\n")
    assert rkel("-c", str(path), "config", "validate").returncode == 0


# ---------------------------------------------------------------------------- the round trip
names = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)
octet = st.integers(1, 254)
addresses = st.builds(lambda a, b: f"10.{a}.0.{b}", octet, octet)
nodes = st.builds(
    NodeDraft,
    address=addresses,
    user=names,
    roles=st.sets(st.sampled_from(("controlplane", "etcd", "worker")), min_size=1).map(
        lambda r: tuple(sorted(r))),
    port=st.integers(1, 65535),
    ssh_key_path=st.sampled_from(("", "~/.ssh/id_ed25519", "/keys/node key")),
    hostname_override=st.one_of(st.just(""), names),
    internal_address=st.one_of(st.just(""), addresses),
    docker_socket=st.sampled_from(("/var/run/docker.sock", "/run/user/1000/docker.sock")),
)


def _valid(draft: ConfigDraft) -> bool:
    roles = {r for n in draft.nodes for r in n.roles}
    addrs = [n.address for n in draft.nodes]
    node_names = [(n.hostname_override or n.address) for n in draft.nodes]
    return {"etcd", "controlplane"} <= roles and len(set(addrs)) == len(addrs) and \
        len(set(node_names)) == len(node_names)


drafts = st.builds(
    ConfigDraft,
    nodes=st.lists(nodes, min_size=1, max_size=5).map(tuple),
    cluster_name=names,
    kubernetes_version=st.sampled_from(supported_versions()),
    ssh_key_path=st.sampled_from(("~/.ssh/id_rsa", "/etc/rkel/key")),
    network_plugin=st.sampled_from(PLUGINS),
    cluster_domain=st.sampled_from(("cluster.local", "k8s.example.com")),
    service_cluster_ip_range=st.just("10.43.0.0/16"),
    cluster_cidr=st.sampled_from(("10.42.0.0/16", "172.16.0.0/12")),
    cluster_dns_server=st.sampled_from(("10.43.0.10", "10.43.0.53")),
).filter(_valid)


@settings(max_examples=60, deadline=None)
@given(drafts)
def test_what_config_writes_loads_back_to_the_same_answers(draft: ConfigDraft) -> None:
    loaded = load_config_text(render_draft(draft))
    assert loaded.warnings == ()
    assert draft_from_config(loaded.config) == draft


def test_the_new_commands_have_help() -> None:
    for command, needle in ((["config"], "--list-versions"), (["doctor"], "Exit 0 when every"),
                            (["kubeconfig"], "--print")):
        result = rkel(*command, "--help")
        assert result.returncode == 0 and needle in result.stdout, command
