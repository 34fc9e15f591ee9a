"""cluster.yml: load an RKE-format file into the typed model, with every problem reported at once.

loaded = load_config("cluster.yml")      # raises ConfigError(issues) on any error
loaded.config.nodes, loaded.warnings     # warnings: what RKE would have silently ignored
"""

from __future__ import annotations

from lifecycle.config.issues import ConfigIssue, LoadedConfig
from lifecycle.config.loader import load_config, load_config_text

__all__ = ["ConfigIssue", "LoadedConfig", "load_config", "load_config_text"]
