"""Node and service lifecycles as `transitions` state machines.

The tables below are the whole truth about which state may follow which. The machines do no I/O:
the executor asks `advance(kind, state, trigger)` for the next state *before* it performs an effect,
so an invalid move is refused before anything on a host changes, and stores the resulting state
name in the same transaction as the journal row. A machine is rebuilt from a stored state name on
every call; nothing is pickled.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

from transitions import Machine, MachineError

from lifecycle.errors import TransitionError


class State(str, enum.Enum):
    ABSENT = "absent"
    CERTS = "certs"
    RUNNING = "running"
    DRAINING = "draining"
    UPGRADED = "upgraded"
    FAILED = "failed"
    REMOVING = "removing"
    REMOVED = "removed"


_ANY_LIVE = ["absent", "certs", "running", "draining", "upgraded", "failed"]

# trigger, sources, destination
NODE_TRANSITIONS: list[tuple[str, list[str], str]] = [
    ("prepare", ["absent", "failed"], "certs"),  # certificates and files are on the node
    ("start", ["certs", "failed"], "running"),  # every service of the node is up and healthy
    ("refresh", ["running"], "running"),  # certificates or files renewed without disruption
    ("cordon", ["running", "failed"], "draining"),  # unschedulable (and drained when asked)
    ("upgrade", ["draining"], "upgraded"),  # services replaced, node Ready at the new version
    ("uncordon", ["upgraded", "draining"], "running"),  # schedulable again
    ("fail", _ANY_LIVE, "failed"),
    ("remove", _ANY_LIVE, "removing"),
    ("finish_removal", ["removing"], "removed"),
]

SERVICE_TRANSITIONS: list[tuple[str, list[str], str]] = [
    ("prepare", ["absent", "failed"], "certs"),  # the service's files are in place
    ("start", ["certs", "failed"], "running"),  # container created, started and healthy
    ("replace", ["running", "failed"], "draining"),  # old container set aside as old-<name>
    ("upgrade", ["draining"], "upgraded"),  # new container healthy
    ("settle", ["upgraded"], "running"),  # old container removed
    ("restore", ["draining"], "running"),  # new container failed; the old one is back
    ("fail", _ANY_LIVE, "failed"),
    ("remove", _ANY_LIVE, "removed"),
]

TABLES = {"node": NODE_TRANSITIONS, "service": SERVICE_TRANSITIONS}


@dataclass
class _Model:
    state: str


class Lifecycle:
    """One node's or service's machine, rebuilt from its stored state name."""

    def __init__(self, kind: str, state: str) -> None:
        if kind not in TABLES:
            raise ValueError(f"unknown machine kind {kind!r}")
        self.kind = kind
        self.model = _Model(state)
        self.machine = Machine(
            model=self.model,
            states=[s.value for s in State],
            transitions=[
                {"trigger": t, "source": src, "dest": dst} for t, src, dst in TABLES[kind]
            ],
            initial=state,
            auto_transitions=False,
            send_event=False,
        )

    @property
    def state(self) -> str:
        return self.model.state

    def can(self, trigger: str) -> bool:
        return trigger in self.machine.get_triggers(self.model.state)

    def fire(self, trigger: str) -> str:
        """Move along `trigger`; raise TransitionError if the current state does not allow it."""
        if not self.can(trigger):
            allowed = ", ".join(sorted(self.machine.get_triggers(self.model.state))) or "none"
            raise TransitionError(
                f"{self.kind} in state {self.model.state!r} cannot {trigger!r} "
                f"(allowed from here: {allowed})"
            )
        try:
            self.model.trigger(trigger)  # type: ignore[attr-defined]
        except MachineError as exc:  # pragma: no cover - guarded by can()
            raise TransitionError(str(exc.value)) from exc
        return self.model.state


_cache_lock = threading.Lock()
_next: dict[tuple[str, str, str], str] = {}


def advance(kind: str, state: str, *triggers: str) -> str:
    """The state reached from `state` by firing `triggers` in order (validated by the machine)."""
    for trigger in triggers:
        key = (kind, state, trigger)
        with _cache_lock:
            known = _next.get(key)
        if known is None:
            known = Lifecycle(kind, state).fire(trigger)
            with _cache_lock:
                _next[key] = known
        state = known
    return state


def mermaid(kind: str) -> str:
    """The machine of `kind` as a Mermaid state diagram (no graphviz needed)."""
    from transitions.extensions.diagrams import GraphMachine

    model = _Model("absent")
    GraphMachine(  # binds itself to `model`, which then draws the graph
        model=model,
        states=[s.value for s in State],
        transitions=[{"trigger": t, "source": src, "dest": dst} for t, src, dst in TABLES[kind]],
        initial="absent",
        auto_transitions=False,
        graph_engine="mermaid",
        title=f"rkel {kind} lifecycle",
        show_state_attributes=False,
    )
    return str(model.get_graph().draw(None))  # type: ignore[attr-defined]
