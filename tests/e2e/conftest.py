"""The one local testbed (scenarios/testbed/testbed.py) every e2e module shares.

Only one testbed can exist on a machine, so the session owns it: `testbed` brings it into the
shape a module asks for (`up 3` for most, `up 2 --bastion` for the bastion tests), re-running
`up` only when the shape changes, and brings it `down` once at the end of the session. Tests
that take `testbed_up` get the standard three hosts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTBED = ROOT / "scenarios" / "testbed" / "testbed.py"
STATE_DIR = Path(os.environ.get("RKEL_TESTBED_DIR", "/var/lib/rkel-testbed"))
STANDARD = ("3",)
BASTION = ("2", "--bastion")
T = TypeVar("T")


def run_testbed(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run testbed.py with this session's state dir."""
    cmd = [sys.executable, str(TESTBED), "--state-dir", str(STATE_DIR), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


class Testbed:
    """The session's testbed: its state dir, key, cluster.yml, and the shape it is in."""

    __test__ = False  # not a test class, despite the name

    def __init__(self) -> None:
        self.state_dir = STATE_DIR
        self.key = STATE_DIR / "keys" / "id_ed25519"
        self.cluster_yml = STATE_DIR / "cluster.yml"
        self.shape: tuple[str, ...] | None = None

    def ensure(self, shape: tuple[str, ...] = STANDARD) -> None:
        """`up` in `shape` unless the testbed is already in it (a reshape rebuilds the hosts)."""
        if self.shape == shape:
            return
        self.shape = None  # unknown until `up` succeeds
        res = run_testbed("up", *shape)
        assert res.returncode == 0, f"testbed up {' '.join(shape)} failed:\n{res.stderr}"
        self.shape = shape


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    if os.geteuid() != 0:
        pytest.fail("the e2e testbed needs root (namespaces, bridges, dockerd): run pytest as root")
    tb = Testbed()
    try:
        yield tb
    finally:
        down = run_testbed("down")
        assert down.returncode == 0, down.stderr


@pytest.fixture
def testbed_up(testbed: Testbed) -> None:
    """The standard testbed: hosts rkn1..3 on 10.77.0.11-13, all roles."""
    testbed.ensure(STANDARD)


@contextmanager
def cluster_story(cls: Callable[[Path, Testbed], T], testbed: Testbed,
                  factory: pytest.TempPathFactory, name: str) -> Iterator[T]:
    """A story on the standard 4-host testbed in a fresh workdir; afterwards, whatever happened,
    an interrupted run is finished and the cluster removed, and the wall times are printed."""
    testbed.ensure(("4",))
    story = cls(factory.mktemp(name), testbed)
    try:
        yield story
    finally:
        workdir: Path = story.workdir  # type: ignore[attr-defined]
        if (workdir / "cluster.yml").exists():
            story.rkel("apply", "--resume", "--yes")  # type: ignore[attr-defined]
            story.rkel("remove", "--force")  # type: ignore[attr-defined]
        for label, seconds in sorted(story.timings.items()):  # type: ignore[attr-defined]
            print(f"{label}: {seconds:.1f}s wall")
