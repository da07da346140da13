"""Node configuration: every setting, its default, and the validation of them all.

Every setting is a field of :class:`Config` with its default and a one-line meaning;
``docs/configuration.md`` lists them. Validation happens at start and names the bad
key and value, so a typo in a config file fails loudly instead of being ignored.
Reading them from a TOML file, ``FASTIM_*`` variables and flags is :mod:`.loading`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field, fields
from typing import Any

from ..store import HistoryLimits, InboxLimits, StoreSettings
from .endpoints import parse_endpoints
from .events import check_events
from .machine import check_host, need_extra
from .namespaces import RULE_KEYS, RULE_VALUES, Namespace, Namespaces, check_namespaces
from .origins import OriginPolicy
from .security import ANONYMOUS_VALUES, MIN_SECRET_BYTES, load_public_key, tls_server_context

#: the most worker processes ``workers`` may ask for (a typo must not fork a thousand nodes)
MAX_WORKERS = 256


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type, or out of range. The message names it."""


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class Config:
    """Settings of one fastim node. Network listeners bind to loopback by default."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    tcp_port: int = field(default=7070, metadata={"help": "fastim TCP port (0 disables)"})
    ws_port: int = field(default=7071, metadata={"help": "WebSocket/HTTP port (0 disables)"})
    ws_path: str = field(default="/ws", metadata={"help": "WebSocket endpoint path"})
    ws_echo_path: str = field(
        default="", metadata={"help": "echo endpoint path for conformance suites ('' = off)"}
    )
    ws_compression: int = field(
        default=6,
        metadata={
            "help": "permessage-deflate for WebSocket clients that offer it: the zlib level, "
            "1 (fastest) to 9 (smallest); 0 turns it off"
        },
    )
    ws_compression_min_size: int = field(
        default=256,
        metadata={"help": "messages shorter than this many bytes are sent uncompressed"},
    )
    demo: int = field(
        default=1,
        metadata={"help": "1: serve the demo chat at /demo on the WebSocket port; 0: 404 there"},
    )
    node_id: str = field(default_factory=_default_node_id, metadata={"help": "this node's name"})
    max_frame: int = field(
        default=1 << 20, metadata={"help": "largest fastim frame payload accepted, bytes"}
    )
    max_message: int = field(
        default=1 << 20, metadata={"help": "largest WebSocket message accepted, bytes"}
    )
    max_subscriptions: int = field(
        default=1024, metadata={"help": "channels one connection may subscribe to"}
    )
    max_channels: int = field(
        default=1_000_000, metadata={"help": "channels the node keeps at once"}
    )
    max_connections: int = field(
        default=200_000, metadata={"help": "client connections the node accepts at once"}
    )
    outbound_cap: int = field(
        default=4 << 20,
        metadata={"help": "bytes queued for one client before it is closed as slow"},
    )
    max_connections_per_ip: int = field(
        default=10_000, metadata={"help": "connections one client address may hold (0: no limit)"}
    )
    connect_rate_per_ip: float = field(
        default=200.0,
        metadata={"help": "new connections per second from one address, burst 2x (0: no limit)"},
    )
    ip_limits_exempt: str = field(
        default="127.0.0.0/8,::1",
        metadata={"help": "comma-separated networks the per-address limits do not apply to"},
    )
    publish_rate: float = field(
        default=10_000.0,
        metadata={"help": "publishes and sends per second per connection, burst 2x (0: no limit)"},
    )
    rate_limit_strikes: int = field(
        default=100,
        metadata={"help": "refusals for rate before the connection is closed (4002)"},
    )
    history_size: int = field(
        default=128, metadata={"help": "messages kept per channel (for recovery)"}
    )
    history_ttl: float = field(
        default=300.0,
        metadata={"help": "seconds a message stays in history, recoverable (0: no age limit)"},
    )
    ping_interval: float = field(
        default=25.0, metadata={"help": "seconds of silence before the server pings a client"}
    )
    pong_timeout: float = field(
        default=10.0, metadata={"help": "seconds a client has to answer a ping"}
    )
    handshake_timeout: float = field(
        default=10.0, metadata={"help": "seconds to finish HELLO (TCP) or the HTTP upgrade"}
    )
    close_timeout: float = field(
        default=2.0, metadata={"help": "seconds to wait for the peer's close before dropping"}
    )
    shutdown_timeout: float = field(
        default=5.0, metadata={"help": "seconds a graceful shutdown may take"}
    )
    backlog: int = field(default=4096, metadata={"help": "listen() backlog"})
    ring_pool: int = field(
        default=32 << 20,
        metadata={"help": "bytes of emptied out-ring buffers kept for reuse (0: none)"},
    )
    direct_write: int = field(
        default=1,
        metadata={
            "help": "1: flushes write to plain sockets from the compiled core; "
            "0: through the asyncio transport (for comparison)"
        },
    )
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})
    recovery_max: int = field(
        default=10_000,
        metadata={"help": "messages one subscribe may recover (a longer gap: not recovered)"},
    )
    presence_max: int = field(
        default=100, metadata={"help": "user ids a presence reply lists at most"}
    )
    dm_retry: float = field(
        default=2.0,
        metadata={"help": "seconds before an unacked direct message is sent again (doubling)"},
    )
    #: ``[namespaces.NAME]`` tables of the config file (see fastim.config.namespaces); file only
    namespaces: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "per-namespace settings: [namespaces.NAME] tables", "file_only": True},
    )
    # ---- who may connect and what they may do (fastim/auth.py, docs/security.md)
    anonymous: str = field(
        default="auto",
        metadata={
            "help": "connections without a token: on, off, or auto (on unless jwt_secret or "
            "jwt_public_key is set)"
        },
    )
    jwt_secret: str = field(
        default="",
        metadata={
            "help": "HMAC secret (>= 32 bytes) verifying HS256/384/512 connect tokens; '' = "
            "none. Prefer FASTIM_JWT_SECRET or the file to the flag"
        },
    )
    jwt_public_key: str = field(
        default="",
        metadata={"help": "PEM file of the public key (RSA, EC, Ed25519) verifying tokens"},
    )
    jwt_audience: str = field(
        default="", metadata={"help": "required token aud claim ('' = tokens without aud)"}
    )
    jwt_issuer: str = field(
        default="", metadata={"help": "required token iss claim ('' = not checked)"}
    )
    jwt_leeway: float = field(
        default=5.0, metadata={"help": "seconds of clock skew allowed on nbf and iat (not exp)"}
    )
    allow_subscribe: str = field(
        default="any",
        metadata={"help": "who may subscribe, unless a namespace says: any, user, token, none"},
    )
    allow_publish: str = field(
        default="any",
        metadata={"help": "who may publish, unless a namespace says: any, user, token, none"},
    )
    allow_history: str = field(
        default="any",
        metadata={"help": "who may subscribe with since (recover history): any, user, token, none"},
    )
    allow_presence: str = field(
        default="any",
        metadata={"help": "who may ask for presence: any, user, token, none"},
    )
    tls_cert: str = field(
        default="", metadata={"help": "PEM certificate chain: both listeners speak TLS ('' = off)"}
    )
    tls_key: str = field(default="", metadata={"help": "PEM private key of tls_cert"})
    tls_client_ca: str = field(
        default="",
        metadata={"help": "PEM CA file: clients must present a certificate it signed ('' = no)"},
    )
    # ---- which web pages may connect from a browser (fastim/transport/origin.py)
    allowed_origins: str = field(
        default="",
        metadata={
            "help": "comma-separated origins (https://app.example.com, https://*.example.com, "
            "http://localhost:*) whose pages may open WebSockets besides the node's own; "
            "'*' = any ('' = only the node's own origin)"
        },
    )
    static_allowed_origins: str = field(
        default="*",
        metadata={
            "help": "origins whose pages may import /fastim.js (CORS): '*' = any, '' = only "
            "the node's own, or patterns as allowed_origins"
        },
    )
    store: str = field(
        default="sqlite",
        metadata={
            "help": "where history and inboxes live: sqlite (durable, the default), memory "
            "(volatile: a restart loses them) or redis (shared by a cluster)"
        },
    )
    store_path: str = field(
        default="fastim.db",
        metadata={"help": "sqlite store: database file, relative to the working directory"},
    )
    sqlite_synchronous: str = field(
        default="normal",
        metadata={"help": "sqlite store: normal (survives kill -9) or full (also power loss)"},
    )
    redis_url: str = field(
        default="redis://127.0.0.1:6379/0", metadata={"help": "redis store: server URL"}
    )
    redis_prefix: str = field(default="fastim", metadata={"help": "redis store: key prefix"})
    redis_timeout: float = field(
        default=2.0, metadata={"help": "redis store: seconds to wait for a connection or reply"}
    )
    history_meta_ttl: float = field(
        default=86400.0,
        metadata={
            "help": "seconds a channel's epoch and offset outlive its last publish (0 = ever)"
        },
    )
    inbox_max: int = field(
        default=10_000, metadata={"help": "unacknowledged direct messages one inbox holds"}
    )
    inbox_dedup_window: float = field(
        default=86400.0,
        metadata={"help": "seconds a sender's client message id is remembered (idempotent send)"},
    )
    idempotency_window: float = field(
        default=86400.0,
        metadata={
            "help": "seconds a channel remembers a publish's idempotency key (0 = not at all)"
        },
    )
    api_key: str = field(
        default="",
        metadata={
            "help": "key of the server HTTP API under /api/ (Authorization: Bearer KEY or "
            "X-API-Key); '' turns the API off. Prefer FASTIM_API_KEY or the file to the flag"
        },
    )
    log_format: str = field(
        default="text", metadata={"help": "text, or json (one JSON object per line)"}
    )
    # ---- cluster (fastim/cluster/, docs/cluster.md)
    etcd_endpoints: str = field(
        default="",
        metadata={"help": "comma-separated etcd host:port list to join a cluster ('' = one node)"},
    )
    cluster_name: str = field(
        default="fastim", metadata={"help": "name of the cluster this node joins"}
    )
    etcd_prefix: str = field(
        default="/fastim",
        metadata={"help": "etcd key prefix: nodes register at PREFIX/CLUSTER/nodes/NODE_ID"},
    )
    node_lease_ttl: int = field(
        default=5,
        metadata={"help": "seconds a node stays registered after its last etcd keepalive (>= 2)"},
    )
    link_port: int = field(
        default=0,
        metadata={
            "help": "port accepting links from the other nodes of the cluster (0 = any free "
            "port, registered in etcd)"
        },
    )
    tree_k: int = field(
        default=8, metadata={"help": "children per node in a channel's broadcast tree (>= 2)"}
    )
    advertise_host: str = field(
        default="",
        metadata={
            "help": "host other nodes reach this node at, registered in etcd ('' = host; "
            "required when host is 0.0.0.0 or ::)"
        },
    )
    link_tls_cert: str = field(
        default="",
        metadata={"help": "PEM certificate of this node for node links: mutual TLS ('' = plain)"},
    )
    link_tls_key: str = field(default="", metadata={"help": "PEM private key of link_tls_cert"})
    link_tls_ca: str = field(
        default="",
        metadata={"help": "PEM CA that signed every node's link certificate (with link_tls_cert)"},
    )
    # ---- one node, every core (fastim/workers/, docs/workers.md)
    workers: int | str = field(
        default=1,
        metadata={
            "help": "worker processes of this node, sharing its ports (1 = one process, no "
            "supervisor; 'auto' = one per CPU this process may run on)"
        },
    )
    worker_hang_timeout: float = field(
        default=5.0,
        metadata={
            "help": "seconds a worker may go without pinging its supervisor before it is "
            "killed (SIGKILL) and replaced (>= 1)"
        },
    )
    worker_restart_backoff: float = field(
        default=5.0,
        metadata={
            "help": "longest wait, in seconds, before a dead worker is started again (the "
            "wait starts at 0.1 s and doubles)"
        },
    )
    # ---- event webhooks (fastim/backend/, docs/events.md)
    events_url: str = field(
        default="",
        metadata={"help": "URL that receives batched events, at least once (POST; '' = off)"},
    )
    events: str = field(
        default="connect,disconnect,subscribe,unsubscribe,join,leave,dm,publish",
        metadata={
            "help": "event kinds sent to events_url (join/leave: namespaces with join_leave; "
            "publish: namespaces with events_publish)"
        },
    )
    events_timeout: float = field(
        default=5.0, metadata={"help": "seconds an events_url request may take before a retry"}
    )
    events_batch: int = field(default=100, metadata={"help": "most events in one POST"})
    events_retry_max: float = field(
        default=30.0,
        metadata={"help": "longest wait, in seconds, between retries of a failed POST"},
    )
    events_lease: float = field(
        default=10.0,
        metadata={
            "help": "seconds without renewal after which another process takes over sending, "
            "and a process counts as lost (its connections get disconnect node_lost)"
        },
    )
    events_secret: str = field(
        default="",
        metadata={
            "help": "sent as 'Authorization: Bearer SECRET' with each POST ('' = none); "
            "prefer FASTIM_EVENTS_SECRET or the file to the flag"
        },
    )
    events_headers: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "extra HTTP headers of each POST: [events_headers]", "file_only": True},
    )

    max_connections_per_user: int = field(
        default=0,
        metadata={
            "help": "connections one user may hold over every worker and node (0: no limit); "
            "see user_limit_policy"
        },
    )
    user_limit_policy: str = field(
        default="refuse_new",
        metadata={
            "help": "over max_connections_per_user: refuse_new (the new connection is closed, "
            "4511) or close_oldest (the oldest are closed, 4512)"
        },
    )
    personal_channels: int = field(
        default=0,
        metadata={
            "help": "1: every connection with a user is subscribed by the node to its user's "
            "personal channel #<user> (clients cannot subscribe or publish there)"
        },
    )
    # ---- the application's backend in the loop: proxy hooks (docs/proxy.md)
    proxy_connect_url: str = field(
        default="",
        metadata={
            "help": "URL POSTed at each connection without a token (WebSocket upgrade, TCP "
            "HELLO): the backend answers its user, channels, expiry ('' = off)"
        },
    )
    proxy_refresh_url: str = field(
        default="",
        metadata={"help": "URL POSTed when a connect hook's expire_at comes ('' = close then)"},
    )
    proxy_subscribe_url: str = field(
        default="",
        metadata={"help": "URL POSTed for each subscribe: allow or deny per channel ('' = off)"},
    )
    proxy_publish_url: str = field(
        default="",
        metadata={
            "help": "URL POSTed for each client publish: allow, deny, or replace the data "
            "('' = off)"
        },
    )
    proxy_rpc_url: str = field(
        default="",
        metadata={"help": 'URL POSTed for {"op":"rpc"}: the backend answers ("" = no rpc)'},
    )
    proxy_timeout: float = field(
        default=1.0, metadata={"help": "seconds a proxy hook has to answer (then 120)"}
    )
    proxy_max_inflight: int = field(
        default=256,
        metadata={"help": "proxy requests in flight to the backend at once (pooled connections)"},
    )
    proxy_http_headers: str = field(
        default="Cookie,Authorization,Origin,User-Agent,X-Forwarded-For,X-Real-Ip,X-Request-Id",
        metadata={
            "help": "headers of the client's WebSocket upgrade copied to the connect hook "
            "(comma-separated)"
        },
    )
    proxy_static_headers: str = field(
        default="",
        metadata={
            "help": "headers added to every proxy request, 'Name: value; Name2: value2' "
            "(e.g. a secret the backend checks; never logged)"
        },
    )
    proxy_breaker_failures: int = field(
        default=5,
        metadata={"help": "consecutive failures of a hook that open its circuit breaker"},
    )
    proxy_breaker_cooldown: float = field(
        default=5.0,
        metadata={
            "help": "seconds an open breaker fails fast before one probe request is let through"
        },
    )

    # ---- publish from a Redis stream (fastim/ingest/, docs/ingest.md)
    ingest_redis_stream: str = field(
        default="",
        metadata={"help": "Redis stream(s) to publish from, comma-separated (shards); '' = off"},
    )
    ingest_redis_url: str = field(
        default="", metadata={"help": "Redis of the ingest streams ('' = redis_url)"}
    )
    ingest_group: str = field(
        default="fastim", metadata={"help": "consumer group the nodes share on the streams"}
    )
    ingest_consumer: str = field(
        default="",
        metadata={"help": "this node's consumer name in the group ('' = node_id)"},
    )
    ingest_dead_letter: str = field(
        default="",
        metadata={"help": "stream poison entries go to ('' = STREAM:dead, per stream)"},
    )
    ingest_idempotency_window: float = field(
        default=86400.0,
        metadata={"help": "seconds an entry's idempotency key is remembered (> 0)"},
    )
    ingest_batch: int = field(
        default=200,
        metadata={"help": "entries read at once per stream, at most in flight (1..10000)"},
    )
    ingest_claim_idle: float = field(
        default=10.0,
        metadata={
            "help": "seconds a stream's lease outlives its consumer's last renewal: then "
            "another consumer takes the stream and its pending entries (>= 1)"
        },
    )
    ingest_max_deliveries: int = field(
        default=10,
        metadata={"help": "deliveries of one entry after which it is poison (>= 1)"},
    )

    def validate(self) -> Config:
        """Raise ConfigError naming the first bad setting; return self."""
        self._origins_as_strings()
        for f in fields(self):
            if f.metadata.get("file_only"):
                continue
            value = getattr(self, f.name)
            want: Any = {"int": int, "float": (int, float), "str": str, "int | str": (int, str)}[
                str(f.type)
            ]
            if isinstance(value, bool) or not isinstance(value, want):
                raise ConfigError(
                    f"{f.name}: expected {f.type}, got {type(value).__name__} {value!r}"
                )
        try:
            check_host(self.host)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for name in ("tcp_port", "ws_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name}: must be 0..65535, got {port}")
        if self.tcp_port == 0 and self.ws_port == 0:
            raise ConfigError("tcp_port and ws_port are both 0: nothing to listen on")
        for name in ("max_frame", "max_message", "outbound_cap", "max_connections", "backlog"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_frame > 0xFFFFFFFF:
            raise ConfigError(f"max_frame: must be < 2**32, got {self.max_frame}")
        for name in ("max_subscriptions", "max_channels", "history_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in (
            "ping_interval",
            "pong_timeout",
            "handshake_timeout",
            "close_timeout",
            "shutdown_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0 seconds, got {getattr(self, name)}")
        for name in ("max_connections_per_ip", "rate_limit_strikes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("connect_rate_per_ip", "publish_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0 (0: no limit), got {getattr(self, name)}")
        try:
            self.exempt_networks()
        except ValueError as e:
            raise ConfigError(f"ip_limits_exempt: {e}") from None
        if self.ring_pool < 0:
            raise ConfigError(f"ring_pool: must be >= 0, got {self.ring_pool}")
        if self.direct_write not in (0, 1):
            raise ConfigError(f"direct_write: must be 0 or 1, got {self.direct_write}")
        if self.demo not in (0, 1):
            raise ConfigError(f"demo: must be 0 or 1, got {self.demo}")
        if self.history_ttl < 0:
            raise ConfigError(f"history_ttl: must be >= 0, got {self.history_ttl}")
        for name in ("ws_path", "ws_echo_path"):
            p = getattr(self, name)
            if p and not p.startswith("/"):
                raise ConfigError(f"{name}: must start with '/', got {p!r}")
        if self.ws_echo_path and self.ws_echo_path == self.ws_path:
            raise ConfigError("ws_echo_path: must differ from ws_path")
        if not 0 <= self.ws_compression <= 9:
            raise ConfigError(f"ws_compression: must be 0 (off) to 9, got {self.ws_compression}")
        if self.ws_compression_min_size < 0:
            raise ConfigError(
                f"ws_compression_min_size: must be >= 0, got {self.ws_compression_min_size}"
            )
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(
                f"log_level: must be debug, info, warning or error, got {self.log_level!r}"
            )
        self._validate_store()
        self._validate_observability()
        for name in ("recovery_max", "presence_max"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not self.dm_retry > 0:
            raise ConfigError(f"dm_retry: must be > 0 seconds, got {self.dm_retry}")
        try:
            self.namespaces = check_namespaces(self.namespaces)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._validate_security()
        self._validate_origins()
        self._validate_cluster()
        self._validate_workers()
        self._validate_proxy()
        if self.max_connections_per_user < 0:
            raise ConfigError(
                f"max_connections_per_user: must be >= 0 (0: no limit), "
                f"got {self.max_connections_per_user}"
            )
        if self.user_limit_policy not in ("refuse_new", "close_oldest"):
            raise ConfigError(
                "user_limit_policy: must be refuse_new or close_oldest, "
                f"got {self.user_limit_policy!r}"
            )
        if self.personal_channels not in (0, 1):
            raise ConfigError(f"personal_channels: must be 0 or 1, got {self.personal_channels}")
        self._validate_ingest()
        try:
            check_events(self)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    def proxy_urls(self) -> dict[str, str]:
        """The proxy hooks that are on: hook name → URL (docs/proxy.md)."""
        urls = {
            "connect": self.proxy_connect_url,
            "refresh": self.proxy_refresh_url,
            "subscribe": self.proxy_subscribe_url,
            "publish": self.proxy_publish_url,
            "rpc": self.proxy_rpc_url,
        }
        return {name: url for name, url in urls.items() if url}

    def proxy_headers(self) -> tuple[list[str], dict[str, str]]:
        """(upgrade headers copied to the connect hook, lower-case; static headers)."""
        copied = [h.strip().lower() for h in self.proxy_http_headers.split(",") if h.strip()]
        static: dict[str, str] = {}
        for part in self.proxy_static_headers.split(";"):
            if part.strip():
                name, _, value = part.partition(":")
                static[name.strip()] = value.strip()
        return copied, static

    def _validate_proxy(self) -> None:
        for name, url in self.proxy_urls().items():
            if not re.match(r"^https?://[^/\s]+", url):
                raise ConfigError(
                    f"proxy_{name}_url: must be an http:// or https:// URL, got {url!r}"
                )
        if not self.proxy_timeout > 0:
            raise ConfigError(f"proxy_timeout: must be > 0 seconds, got {self.proxy_timeout}")
        if self.proxy_max_inflight < 1:
            raise ConfigError(f"proxy_max_inflight: must be >= 1, got {self.proxy_max_inflight}")
        if self.proxy_breaker_failures < 1:
            raise ConfigError(
                f"proxy_breaker_failures: must be >= 1, got {self.proxy_breaker_failures}"
            )
        if not self.proxy_breaker_cooldown > 0:
            raise ConfigError(
                f"proxy_breaker_cooldown: must be > 0 seconds, got {self.proxy_breaker_cooldown}"
            )
        token = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
        for h in self.proxy_http_headers.split(","):
            if h.strip() and not token.match(h.strip()):
                raise ConfigError(f"proxy_http_headers: {h.strip()!r} is not a header name")
        for i, part in enumerate(self.proxy_static_headers.split(";")):
            if not part.strip():
                continue
            name, colon, value = part.partition(":")
            if not colon or not token.match(name.strip()) or "\n" in value or "\r" in value:
                # the value may be a secret: the message names the entry, not its text
                raise ConfigError(
                    f"proxy_static_headers: entry {i + 1} is not 'Name: value' "
                    "(entries are separated by ';')"
                )

    def _origins_as_strings(self) -> None:
        """allowed_origins and static_allowed_origins may be TOML arrays: joined with ','."""
        for name in ("allowed_origins", "static_allowed_origins"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
                setattr(self, name, ",".join(value))

    def _validate_origins(self) -> None:
        """Origin patterns (fastim/transport/origin.py): the entry that does not parse."""
        for name in ("allowed_origins", "static_allowed_origins"):
            try:
                OriginPolicy(getattr(self, name))
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None

    def _validate_observability(self) -> None:
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format: must be text or json, got {self.log_format!r}")
        key = self.api_key
        if key and (len(key) < 16 or not key.isprintable() or not key.isascii() or " " in key):
            # the value itself is a secret: never in an error message
            raise ConfigError(
                "api_key: must be at least 16 printable ASCII characters without spaces "
                f"(got {len(key)} characters)"
            )

    def _validate_store(self) -> None:
        if self.store not in ("memory", "sqlite", "redis"):
            raise ConfigError(f"store: must be memory, sqlite or redis, got {self.store!r}")
        if self.store == "redis":
            self._need_extra("redis", "store", "the redis store", "redis")
        if not self.store_path:
            raise ConfigError("store_path: must not be empty")
        if self.sqlite_synchronous not in ("normal", "full"):
            raise ConfigError(
                f"sqlite_synchronous: must be normal or full, got {self.sqlite_synchronous!r}"
            )
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"redis_url: must start with redis://, rediss:// or unix://, got {self.redis_url!r}"
            )
        if not self.redis_prefix or "{" in self.redis_prefix or "}" in self.redis_prefix:
            raise ConfigError(
                f"redis_prefix: must be non-empty, without braces, got {self.redis_prefix!r}"
            )
        if not self.redis_timeout > 0:
            raise ConfigError(f"redis_timeout: must be > 0 seconds, got {self.redis_timeout}")
        if self.inbox_max < 1:
            raise ConfigError(f"inbox_max: must be >= 1, got {self.inbox_max}")
        for name in ("history_meta_ttl", "inbox_dedup_window", "idempotency_window"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")

    def _validate_security(self) -> None:
        """Tokens, rules and TLS: reads the key and certificate files, so that
        ``fastim config check`` and the start fail on a wrong path, not the first client."""
        if self.anonymous not in ANONYMOUS_VALUES:
            raise ConfigError(f"anonymous: must be auto, on or off, got {self.anonymous!r}")
        if self.jwt_secret and len(self.jwt_secret.encode()) < MIN_SECRET_BYTES:
            # the value itself is never repeated: it is a secret
            raise ConfigError(
                f"jwt_secret: at least {MIN_SECRET_BYTES} bytes (RFC 7518 §3.2), "
                f"got {len(self.jwt_secret.encode())}"
            )
        if self.jwt_public_key:
            try:
                load_public_key(self.jwt_public_key)
            except ValueError as e:
                raise ConfigError(f"jwt_public_key: {e}") from None
        if not self.jwt_leeway >= 0:
            raise ConfigError(f"jwt_leeway: must be >= 0 seconds, got {self.jwt_leeway}")
        configured = bool(self.jwt_secret or self.jwt_public_key)
        if self.anonymous == "off" and not configured:
            raise ConfigError(
                "anonymous: 'off' needs jwt_secret or jwt_public_key (else no one can connect)"
            )
        for name in RULE_KEYS:
            rule = getattr(self, name)
            if rule not in RULE_VALUES:
                raise ConfigError(f"{name}: must be one of {', '.join(RULE_VALUES)}, got {rule!r}")
            if rule in ("user", "token") and not configured:
                raise ConfigError(f"{name}: {rule!r} needs jwt_secret or jwt_public_key")
        if not configured:
            for ns, table in self.namespaces.items():
                for key, value in table.items():
                    if key.startswith("allow_") and value in ("user", "token"):
                        raise ConfigError(
                            f"namespaces.{ns}.{key}: {value!r} needs jwt_secret or jwt_public_key"
                        )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key: set both (PEM files) or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_client_ca: needs tls_cert and tls_key")
        try:
            tls_server_context(self.tls_cert, self.tls_key, self.tls_client_ca)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _validate_cluster(self) -> None:
        """Cluster settings (fastim.cluster): checked even while etcd_endpoints is empty."""
        try:
            parse_endpoints(self.etcd_endpoints)
        except ValueError as e:
            raise ConfigError(f"etcd_endpoints: {e}") from None
        if self.etcd_endpoints:
            self._need_extra("aetcd", "etcd_endpoints", "a cluster (etcd)", "cluster")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", self.cluster_name):
            raise ConfigError(
                "cluster_name: 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                f"or digit, got {self.cluster_name!r}"
            )
        p = self.etcd_prefix
        if (
            not p.startswith("/")
            or p.endswith("/")
            or len(p) > 200
            or any(c.isspace() or not c.isprintable() for c in p)
        ):
            raise ConfigError(
                f"etcd_prefix: must start with '/', not end with one, no spaces, got {p!r}"
            )
        if not 2 <= self.node_lease_ttl <= 3600:
            raise ConfigError(f"node_lease_ttl: must be 2..3600 seconds, got {self.node_lease_ttl}")
        if not 0 <= self.link_port <= 65535:
            raise ConfigError(f"link_port: must be 0..65535, got {self.link_port}")
        if not 2 <= self.tree_k <= 1024:
            raise ConfigError(f"tree_k: must be 2..1024, got {self.tree_k}")
        if self.etcd_endpoints and "/" in self.node_id:
            raise ConfigError(f"node_id: must not contain '/' in a cluster, got {self.node_id!r}")
        a = self.advertise_host
        if a and (
            len(a) > 253
            or a.startswith("[")
            or "/" in a
            or any(c.isspace() or not c.isprintable() for c in a)
        ):
            raise ConfigError(
                f"advertise_host: a host name or IP address (no port, no brackets), got {a!r}"
            )
        if self.etcd_endpoints and not a and self.host in ("0.0.0.0", "::", ""):
            raise ConfigError(
                f"advertise_host: host {self.host!r} listens on every address; set "
                "advertise_host to the address other nodes reach this one at"
            )
        tls = (self.link_tls_cert, self.link_tls_key, self.link_tls_ca)
        if any(tls) and not all(tls):
            raise ConfigError(
                "link_tls_cert, link_tls_key, link_tls_ca: set all three (mutual TLS between "
                "nodes) or none"
            )
        for name, path in zip(("link_tls_cert", "link_tls_key", "link_tls_ca"), tls, strict=True):
            if path and not os.path.isfile(path):
                raise ConfigError(f"{name}: no such file {path!r}")

    def _validate_workers(self) -> None:
        """``workers``: a count (a flag or a variable gives it as a string) or ``auto``."""
        w = self.workers
        if isinstance(w, str):
            text = w.strip().lower()
            if text == "auto":
                self.workers = "auto"
            elif re.fullmatch(r"[0-9]+", text):
                self.workers = int(text)
            else:
                raise ConfigError(
                    f"workers: must be a number of processes (1..{MAX_WORKERS}) or 'auto', "
                    f"got {w!r}"
                )
        if isinstance(self.workers, int) and not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(
                f"workers: must be a number of processes (1..{MAX_WORKERS}) or 'auto', "
                f"got {self.workers}"
            )
        # a worker pings every 0.5 s (fastim.workers.role.PING_EVERY): at least two pings
        if not self.worker_hang_timeout >= 1.0:
            raise ConfigError(
                f"worker_hang_timeout: must be >= 1 second, got {self.worker_hang_timeout}"
            )
        if not self.worker_restart_backoff > 0:
            raise ConfigError(
                f"worker_restart_backoff: must be > 0 seconds, got {self.worker_restart_backoff}"
            )

    def _validate_ingest(self) -> None:
        """The ``ingest_*`` settings (fastim/ingest/redis_stream.py)."""
        if not self.ingest_redis_stream:
            return
        self._need_extra("redis", "ingest_redis_stream", "publishing from a stream", "redis")
        streams = [s.strip() for s in self.ingest_redis_stream.split(",")]
        if any(not s for s in streams) or len(set(streams)) != len(streams):
            raise ConfigError(
                "ingest_redis_stream: comma-separated stream names, none empty or twice, "
                f"got {self.ingest_redis_stream!r}"
            )
        url = self.ingest_redis_url
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"ingest_redis_url: must start with redis://, rediss:// or unix://, got {url!r}"
            )
        for name in ("ingest_group", "ingest_consumer", "ingest_dead_letter"):
            v = getattr(self, name)
            if any(c.isspace() or not c.isprintable() for c in v):
                raise ConfigError(f"{name}: no spaces or control characters, got {v!r}")
        if not self.ingest_group:
            raise ConfigError("ingest_group: must not be empty")
        if self.ingest_dead_letter in streams:
            raise ConfigError("ingest_dead_letter: must not be one of ingest_redis_stream")
        if not self.ingest_idempotency_window > 0:
            raise ConfigError(
                "ingest_idempotency_window: must be > 0 seconds, got "
                f"{self.ingest_idempotency_window}"
            )
        if not 1 <= self.ingest_batch <= 10_000:
            raise ConfigError(f"ingest_batch: must be 1..10000, got {self.ingest_batch}")
        if not self.ingest_claim_idle >= 1:
            raise ConfigError(
                f"ingest_claim_idle: must be >= 1 second, got {self.ingest_claim_idle}"
            )
        if self.ingest_max_deliveries < 1:
            raise ConfigError(
                f"ingest_max_deliveries: must be >= 1, got {self.ingest_max_deliveries}"
            )

    def worker_count(self) -> int:
        """The number of worker processes ``workers`` means: ``auto`` is one per CPU this
        process may run on (its affinity mask, ``taskset``, cpusets)."""
        if self.workers == "auto":
            try:
                return len(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover - not Linux
                return os.cpu_count() or 1
        return int(self.workers)

    def history_limits(self) -> HistoryLimits:
        """``history_size``, ``history_ttl`` and ``history_meta_ttl`` (0 = no limit)."""
        return HistoryLimits(
            self.history_size, self.history_ttl or None, self.history_meta_ttl or None
        )

    def store_settings(self) -> StoreSettings:
        """What the store of this node is opened with (:func:`fastim.store.open_store`)."""
        return StoreSettings(
            kind=self.store,
            path=self.store_path,
            synchronous=self.sqlite_synchronous,
            url=self.redis_url,
            prefix=self.redis_prefix,
            timeout=self.redis_timeout,
            limits=self.history_limits(),
            inbox=InboxLimits(self.inbox_max, self.inbox_dedup_window),
        )

    def namespace_table(self) -> Namespaces:
        """The channel namespaces: the top-level settings, and each ``[namespaces.NAME]``
        table completed from them."""
        default = Namespace(
            "",
            history_size=self.history_size,
            history_ttl=self.history_ttl,
            meta_ttl=self.history_meta_ttl,
            **{key: getattr(self, key) for key in RULE_KEYS},
        )
        return Namespaces(default, self.namespaces)

    def exempt_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [
            ipaddress.ip_network(part.strip(), strict=False)
            for part in self.ip_limits_exempt.split(",")
            if part.strip()
        ]

    @staticmethod
    def _need_extra(module: str, setting: str, what: str, extra: str) -> None:
        try:
            need_extra(module, setting, what, extra)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)
