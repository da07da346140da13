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
    return bool(r["lost"] or r["reordered"] or r["duplicates"] or r["errors"])


def render(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = [
        ("target", f"{r['url']} ({r['target']})"),
    ]
    if r.get("sub_urls"):
        rows.append(("subscribers on", ", ".join(r["sub_urls"])))
    if r.get("mode") == "idle":
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
                f"{srv['cpu_pct']}%" if srv["cpu_pct"] is not None else "unknown (--server-pid)",
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
