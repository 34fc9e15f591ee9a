"""The values the loader hands back: one problem found in cluster.yml, and a loaded file.

Kept apart from the loader so that the walker, the validator and callers share them without an
import cycle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lifecycle.config.model import ClusterConfig

# What a message must not hand a terminal raw: C0/C1 controls (escape sequences), bidi overrides
# and isolates (text that reads differently than it is), line separators and lone surrogates.
_UNSAFE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)
_QUOTED = re.compile(r"`([^`]{81,})`")  # a value quoted in a message, when it is long
MAX_PATH = 200
MAX_MESSAGE = 1000


def printable(text: str) -> str:
    """`text` safe to print: unsafe characters (see _UNSAFE) as `\\uXXXX` escapes."""
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _middle(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    keep = (limit - 20) // 2
    return f"{text[:keep]}...({len(text) - 2 * keep} more)...{text[-keep:]}"


def _clip_quoted(text: str) -> str:
    """Long values quoted in `backticks` cut to their start, with the length they had."""
    return _QUOTED.sub(lambda m: f"`{m.group(1)[:60]}...` ({len(m.group(1))} characters)", text)


def display(text: str, limit: int) -> str:
    """`text` as a message may show it: long quoted values cut, escaped, at most `limit` long."""
    return _middle(printable(_clip_quoted(text)), limit)


@dataclass(frozen=True)
class ConfigIssue:
    """One problem (or warning) in cluster.yml, pinned to its YAML path and 1-based line."""

    path: str  # YAML path like "nodes[2].role[0]" or "services.kube-api.extra_args"
    line: int | None
    message: str  # says what is wrong and what to do
    hint: str = ""  # e.g. "did you mean `hostname_override`?"

    def __post_init__(self) -> None:
        # A hostile file puts megabytes, escape sequences or bidi overrides into keys and values
        # that messages quote: every issue is made safe and short to print once, here.
        object.__setattr__(self, "path", _middle(printable(self.path), MAX_PATH))
        object.__setattr__(self, "message", display(self.message, MAX_MESSAGE))
        object.__setattr__(self, "hint", display(self.hint, MAX_MESSAGE))

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
