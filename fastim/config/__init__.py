"""The node's settings: one :class:`Config` from defaults, a TOML file, ``FASTIM_*``
variables and flags, validated as a whole (:mod:`.settings`), and the parsers it checks
them with, which the parts of the node that use them share: channel namespaces
(:mod:`.namespaces`), origin patterns (:mod:`.origins`), security files and rules
(:mod:`.security`), etcd endpoints (:mod:`.endpoints`).

Below everything that runs: nothing here imports a part of the node.
"""

from .settings import Config, ConfigError, build, load, redact

__all__ = ["Config", "ConfigError", "build", "load", "redact"]
