"""The node and service state machines: every documented path, refusals, rebuilding from a name."""

from __future__ import annotations

import pytest

from lifecycle.errors import RkelError, TransitionError
from lifecycle.machines import (
    NODE_TRANSITIONS,
    SERVICE_TRANSITIONS,
    Lifecycle,
    State,
    advance,
    mermaid,
)

# (kind, start, [(trigger, state reached)]) — the paths DESIGN.md and the tables document.
PATHS = [
    (
        "node",
        "absent",
        [("prepare", "certs"), ("start", "running"), ("cordon", "draining"),
         ("upgrade", "upgraded"), ("uncordon", "running")],
    ),
    ("node", "running", [("refresh", "running")]),
    ("node", "running", [("cordon", "draining"), ("uncordon", "running")]),
    ("node", "certs", [("fail", "failed"), ("prepare", "certs"), ("start", "running")]),
    ("node", "failed", [("start", "running")]),
    ("node", "failed", [("cordon", "draining"), ("upgrade", "upgraded"), ("uncordon", "running")]),
    ("node", "upgraded", [("remove", "removing"), ("finish_removal", "removed")]),
    (
        "service",
        "absent",
        [("prepare", "certs"), ("start", "running"), ("replace", "draining"),
         ("upgrade", "upgraded"), ("settle", "running")],
    ),
    ("service", "running", [("replace", "draining"), ("restore", "running")]),
    (
        "service",
        "failed",
        [("replace", "draining"), ("upgrade", "upgraded"), ("settle", "running")],
    ),
    ("service", "failed", [("start", "running")]),
    ("service", "draining", [("remove", "removed")]),
]


@pytest.mark.parametrize(("kind", "start", "path"), PATHS)
def test_documented_path_step_by_step(kind: str, start: str, path: list[tuple[str, str]]) -> None:
    machine = Lifecycle(kind, start)
    for trigger, expected in path:
        assert machine.can(trigger)
        assert machine.fire(trigger) == expected
        assert machine.state == expected


@pytest.mark.parametrize(("kind", "start", "path"), PATHS)
def test_advance_with_a_chain_matches_firing_one_by_one(
    kind: str, start: str, path: list[tuple[str, str]]
) -> None:
    triggers = [t for t, _ in path]
    assert advance(kind, start, *triggers) == path[-1][1]
    # Each prefix of the chain lands where the step-by-step walk does.
    for i in range(1, len(path) + 1):
        assert advance(kind, start, *triggers[:i]) == path[i - 1][1]


def test_advance_with_no_trigger_keeps_the_state() -> None:
    assert advance("node", "draining") == "draining"


@pytest.mark.parametrize(
    ("kind", "state", "trigger", "allowed"),
    [
        ("node", "absent", "start", ["fail", "prepare", "remove"]),
        ("node", "running", "upgrade", ["cordon", "fail", "refresh", "remove"]),
        ("node", "draining", "restore", ["fail", "remove", "uncordon", "upgrade"]),
        ("service", "running", "settle", ["fail", "remove", "replace"]),
        ("service", "upgraded", "restore", ["fail", "remove", "settle"]),
        ("service", "absent", "replace", ["fail", "prepare", "remove"]),
    ],
)
def test_invalid_transition_names_state_and_allowed_triggers(
    kind: str, state: str, trigger: str, allowed: list[str]
) -> None:
    machine = Lifecycle(kind, state)
    assert not machine.can(trigger)
    with pytest.raises(TransitionError) as info:
        machine.fire(trigger)
    message = str(info.value)
    assert repr(state) in message
    assert repr(trigger) in message
    assert f"allowed from here: {', '.join(allowed)}" in message
    assert machine.state == state  # a refused move changes nothing


def test_transition_error_is_an_rkel_error_with_its_own_exit_code() -> None:
    with pytest.raises(RkelError) as info:
        advance("service", "absent", "upgrade")
    assert isinstance(info.value, TransitionError)
    assert info.value.exit_code == 5


def test_terminal_states_allow_nothing() -> None:
    with pytest.raises(TransitionError, match="allowed from here: none"):
        advance("node", "removed", "prepare")
    with pytest.raises(TransitionError, match="allowed from here: none"):
        advance("service", "removed", "start")


def test_advance_refuses_a_chain_that_breaks_midway() -> None:
    # prepare, start are fine; a second start from running is not.
    with pytest.raises(TransitionError, match="'running' cannot 'start'"):
        advance("node", "absent", "prepare", "start", "start")


def test_refusal_is_not_cached_as_a_success() -> None:
    with pytest.raises(TransitionError):
        advance("node", "certs", "upgrade")
    with pytest.raises(TransitionError):
        advance("node", "certs", "upgrade")
    assert advance("node", "certs", "start") == "running"


@pytest.mark.parametrize("state", [s.value for s in State])
def test_rebuilt_from_a_stored_state_name(state: str) -> None:
    machine = Lifecycle("node", state)
    assert machine.state == state
    # The rebuilt machine offers exactly the triggers the table gives that state.
    expected = sorted({t for t, sources, _ in NODE_TRANSITIONS if state in sources})
    for trigger in {t for t, _, _ in NODE_TRANSITIONS}:
        assert machine.can(trigger) == (trigger in expected)


def test_rebuilt_machine_continues_where_the_stored_one_stopped() -> None:
    stored = Lifecycle("service", "absent")
    stored.fire("prepare")
    stored.fire("start")
    stored.fire("replace")
    again = Lifecycle("service", stored.state)
    assert again.fire("upgrade") == "upgraded"
    assert again.fire("settle") == "running"


def test_machines_are_independent() -> None:
    a = Lifecycle("node", "running")
    b = Lifecycle("node", "running")
    a.fire("cordon")
    assert a.state == "draining"
    assert b.state == "running"


def test_no_auto_transitions() -> None:
    # `transitions` would add to_<state> triggers; a jump straight to running must not exist.
    machine = Lifecycle("node", "absent")
    assert not machine.can("to_running")
    with pytest.raises(TransitionError):
        machine.fire("to_running")


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown machine kind 'pod'"):
        Lifecycle("pod", "absent")


@pytest.mark.parametrize(
    ("kind", "table"), [("node", NODE_TRANSITIONS), ("service", SERVICE_TRANSITIONS)]
)
def test_mermaid_draws_every_state_and_transition(
    kind: str, table: list[tuple[str, list[str], str]]
) -> None:
    text = mermaid(kind)
    assert "stateDiagram" in text
    for state in State:
        assert state.value in text
    for trigger, sources, dest in table:
        for source in sources:
            assert f"{source} --> {dest}: {trigger}" in text


def test_mermaid_node_and_service_differ() -> None:
    node, service = mermaid("node"), mermaid("service")
    assert "draining --> running: restore" in service
    assert "draining --> running: restore" not in node
    assert "removing --> removed: finish_removal" in node
