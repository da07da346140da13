"""The node's settings: one :class:`Config` from defaults, a TOML file, ``FASTIM_*``
variables and flags (:mod:`.loading`), validated as a whole (:mod:`.settings`), and the
parsers it checks them with, which the parts of the node that use them share: channel
namespaces (:mod:`.namespaces`), origin patterns (:mod:`.origins`), security files and
rules (:mod:`.security`), etcd endpoints (:mod:`.endpoints`); what a setting needs of
the machine (:mod:`.machine`: a host that resolves, an installed extra).

Below everything that runs: nothing here imports a part of the node.
"""

from .loading import build, load, redact
from .settings import Config, ConfigError

__all__ = ["Config", "ConfigError", "build", "load", "redact"]
