"""The error tree: one root, a shallow set of kinds, each message saying what to do next.

The CLI turns these into exit codes (see `lifecycle.cli`); nothing below the CLI prints or exits.
"""

from __future__ import annotations


class RkelError(Exception):
    """Root of every error rkel reports to a user."""

    exit_code = 1


class ConfigError(RkelError):
    """cluster.yml could not be read or is not valid; `issues` lists every problem found."""

    exit_code = 2

    def __init__(self, issues: list, source: str = "cluster.yml") -> None:
        self.issues = list(issues)
        self.source = source
        lines = [f"{source}: {len(self.issues)} error(s)"]
        lines += [f"  {issue}" for issue in self.issues]
        super().__init__("\n".join(lines))


class PlanError(RkelError):
    """The desired change cannot be planned safely (quorum, unsupported version, stale plan)."""

    exit_code = 3


class StalePlanError(PlanError):
    """A saved plan was computed from a state that has changed since."""


class StateError(RkelError):
    """The state database is missing, locked, damaged or from a newer rkel."""

    exit_code = 4


class LockHeldError(StateError):
    """Another rkel run holds the lock on this state."""


class ResumeRequiredError(StateError):
    """An earlier run was interrupted; it must be resumed (or abandoned) first."""


class TransitionError(RkelError):
    """A state machine was asked for a transition its current state does not allow."""

    exit_code = 5


class HostError(RkelError):
    """A host could not be reached or refused an operation."""

    exit_code = 6

    def __init__(self, host: str, message: str) -> None:
        self.host = host
        super().__init__(f"{host}: {message}")


class HostUnreachableError(HostError):
    """A host did not answer (SSH or Docker API)."""


class HealthCheckError(HostError):
    """A service never became healthy within its health-check budget."""


class RunFailedError(RkelError):
    """A run finished with failed steps; `failures` maps node name to what failed."""

    exit_code = 7

    def __init__(self, message: str, failures: dict[str, str] | None = None) -> None:
        self.failures = dict(failures or {})
        super().__init__(message)
