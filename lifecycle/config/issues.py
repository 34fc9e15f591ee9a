"""The values the loader hands back: one problem found in cluster.yml, and a loaded file.

Kept apart from the loader so that the walker, the validator and callers share them without an
import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

from lifecycle.config.model import ClusterConfig


@dataclass(frozen=True)
class ConfigIssue:
    """One problem (or warning) in cluster.yml, pinned to its YAML path and 1-based line."""

    path: str  # YAML path like "nodes[2].role[0]" or "services.kube-api.extra_args"
    line: int | None
    message: str  # says what is wrong and what to do
    hint: str = ""  # e.g. "did you mean `hostname_override`?"

    def __str__(self) -> str:
        text = f"line {self.line}: " if self.line is not None else ""
        if self.path:
            text += f"{self.path}: "
        text += self.message
        if self.hint:
            text += f"; {self.hint}"
        return text

    def sort_key(self) -> tuple[int, str, str]:
        """File order: issues without a line (whole-file problems) first."""
        return (self.line or 0, self.path, self.message)


@dataclass(frozen=True)
class LoadedConfig:
    """A valid cluster.yml: the typed config, what RKE would have ignored, and its source."""

    config: ClusterConfig
    warnings: tuple[ConfigIssue, ...]
    source: str
