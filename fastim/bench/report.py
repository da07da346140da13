"""The result of a run: percentiles, whether it failed, and the table printed for it."""

from __future__ import annotations

from typing import Any


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (nearest rank); NaN when there are none."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))
    return s[k]


def failed(r: dict[str, Any]) -> bool:
    """Whether a result shows loss, reordering, duplicates or errors."""
    if r.get("mode") == "idle":
        return bool(r["errors"]) or r["connections"] < r["subscribers"]
    if r.get("mode") == "broadcast":
        return bool(not r["exactly_once"] or r["reordered"] or r["duplicates"] or r["errors"])
    return bool(r["lost"] or r["reordered"] or r["duplicates"] or r["errors"])


def render(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = [
        ("target", f"{r['url']} ({r['target']})"),
    ]
    if r.get("sub_urls"):
        rows.append(("subscribers on", ", ".join(r["sub_urls"])))
    if r.get("server_workers") is not None:
        rows.append(("server workers", _workers(r)))
    if r.get("mode") == "broadcast":
        rows += _broadcast_rows(r)
    elif r.get("mode") == "idle":
        s = r["server"]
        rows += [
            (
                "connections",
                f"{r['connections']:,} idle" + (", subscribed" if r["subscribed"] else ""),
            ),
            ("connect", f"{r['connect_s']:.1f}s"),
            (
                "server RSS",
                f"{s['rss_before_kib']:,} KiB → {s['rss_after_kib']:,} KiB"
                if s["rss_before_kib"] is not None and s["rss_after_kib"] is not None
                else "unknown (give --server-pid)",
            ),
            (
                "RSS per connection",
                f"{s['rss_growth_bytes_per_conn']:,.0f} B"
                if s["rss_growth_bytes_per_conn"] is not None
                else "-",
            ),
        ]
    else:
        lat = r["latency_us"]
        g = r["generator"]
        srv = r["server"]
        rows += [
            ("subscribers", f"{r['subscribers']:,} (connect {r['connect_s']:.1f}s)"),
            (
                "mode",
                f"{r['mode']}"
                + (f" {r['rate']:g} msg/s" if r["rate"] else "")
                + f" (≤{r['inflight']} in flight"
                + (
                    ", counted against every subscriber)"
                    if r.get("window") == "every"
                    else ", counted against the probe)"
                ),
            ),
            ("message size", f"{r['size']} B"),
            (
                "published",
                f"{r['published']:,} in {r['duration_s']:.2f}s = {r['publish_per_s']:,.0f}/s"
                + (f" ({r['acked']:,} acked)" if r["acked"] is not None else ""),
            ),
            ("deliveries", f"{r['deliveries']:,} of {r['deliveries_expected']:,}"),
            ("deliveries/s", f"{r['deliveries_per_s']:,.0f}"),
            (
                "subscribers' lag",
                f"{1000 * r['subscribers_lag_s']:,.1f} ms after the probe's last message",
            ),
            (
                "latency p50/p90/p99",
                f"{lat['p50'] / 1000:,.2f} / {lat['p90'] / 1000:,.2f} / {lat['p99'] / 1000:,.2f} ms"
                f" ({lat['samples']:,} samples, {lat['sampled_subscribers']} subscribers)",
            ),
            (
                "lost / reordered / dup",
                f"{r['lost']:,} / {r['reordered']:,} / {r['duplicates']:,}",
            ),
            (
                "server CPU",
                f"{srv['cpu_pct']}% ({srv['cpu_s']:,.2f} CPU-s, "
                f"{r['deliveries_per_server_cpu_s']:,.0f} deliveries per CPU-s)"
                if srv["cpu_pct"] is not None and r.get("deliveries_per_server_cpu_s")
                else f"{srv['cpu_pct']}%"
                if srv["cpu_pct"] is not None
                else "unknown (--server-pid)",
            ),
            (
                "generator CPU",
                f"{g['total_cpu_pct']}% on {g['cores']} core(s): workers "
                + ", ".join(
                    f"{x}% ({y}% kernel)"
                    for x, y in zip(g["worker_cpu_pct"], g["worker_sys_pct"], strict=True)
                )
                + f"; publisher+probe {g['publisher_cpu_pct']}%",
            ),
        ]
    w = max(len(k) for k, _ in rows)
    lines = [f"  {k.ljust(w)}  {v}" for k, v in rows]
    if r["errors"]:
        lines.append("  errors: " + "; ".join(r["errors"]))
    return "\n".join(lines)


def _workers(r: dict[str, Any]) -> str:
    n = r["server_workers"]
    pids = r.get("server", {}).get("cpu_pids") or []
    if n == 1 and len(pids) <= 1:
        return "1 (one process)"
    return f"{n} (CPU and RSS summed over {len(pids)} processes)"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f} ms"


def _broadcast_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    b = r["broadcast"]
    lat = r["latency_us"]
    s = r["server"]
    hb = r["heartbeats"]
    g = r["generator"]
    per = ", ".join("-" if x is None else f"{x:,.1f}" for x in b["time_to_last_ms"])
    rss = (
        f"{s['rss_kib']:,} KiB = {s['rss_bytes_per_conn']:,.0f} B per connection"
        f" (growth {s['rss_growth_bytes_per_conn']:,.0f} B)"
        if s["rss_kib"] is not None and s["rss_growth_bytes_per_conn"] is not None
        else "unknown (give --server-pid)"
    )
    return [
        ("subscribers", f"{r['subscribers']:,} (connect {r['connect_s']:.1f}s)"),
        (
            "mode",
            f"broadcast: {b['messages']} messages of {r['size']} B, "
            f"{b['gap_s']:g}s apart, one at a time",
        ),
        (
            "time to last p50/p99",
            f"{_ms(b['p50_ms'])} / {_ms(b['p99_ms'])} (max {_ms(b['max_ms'])})",
        ),
        ("  per message (ms)", per),
        (
            "sampled latency p50/p99",
            f"{lat['p50'] / 1000:,.2f} / {lat['p99'] / 1000:,.2f} ms "
            f"(max {(lat['max'] or 0) / 1000:,.2f}; {lat['samples']:,} samples, "
            f"{lat['sampled_subscribers']} subscribers)",
        ),
        (
            "exactly once",
            f"{'yes' if r['exactly_once'] else 'NO'}: {r['connections_exact']:,} connections "
            f"got each message once ({r['connections_over']:,} more; per connection "
            f"{r['per_conn_min']}..{r['per_conn_max']})",
        ),
        ("server RSS", rss),
        (
            "server CPU idle",
            "-"
            if s["idle_cpu_pct"] is None
            else f"{s['idle_cpu_pct']:g}% over {s['idle_window_s']:g}s, every connection open",
        ),
        (
            "heartbeats",
            f"{hb['pings_idle_window']:,} pings answered in the idle window, "
            f"{hb['pings']:,} in all; {hb['closed_by_server_idle']} connections closed",
        ),
        (
            "generator CPU",
            "workers "
            + ", ".join(f"{x}%" for x in g["worker_cpu_pct"])
            + f"; publisher+probe {g['publisher_cpu_pct']}% (during the broadcast)",
        ),
    ]
