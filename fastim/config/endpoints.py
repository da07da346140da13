"""etcd endpoints as written in the settings: parsed here, below the config, so that
``fastim config check`` refuses a bad one and the cluster uses the same parser."""

from __future__ import annotations

from collections.abc import Sequence


def parse_endpoints(spec: str | Sequence[str]) -> list[tuple[str, int]]:
    """``"http://10.0.0.1:2379,10.0.0.2:2379"`` → [(host, port), ...]; ValueError if bad.

    ``http://`` is optional; ``https://`` is refused (the aetcd client speaks plaintext
    gRPC only): keep etcd on a private network or a local proxy.
    """
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for raw in parts:
        ep = raw.strip()
        if not ep:
            continue
        if ep.startswith("https://"):
            raise ValueError(f"{ep!r}: TLS to etcd is not supported (aetcd speaks plain gRPC)")
        if ep.startswith("http://"):
            ep = ep[len("http://") :]
        ep = ep.rstrip("/")
        host, sep, port = ep.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{raw.strip()!r}: expected host:port (e.g. 127.0.0.1:2379)")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        out.append((host, int(port)))
    return out
