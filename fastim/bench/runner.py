"""One run of the bench: the target, the worker processes, the publisher, the result.

``run(args)`` spawns a node when no URL is given (``--server-workers N``: a supervisor
and N workers), starts the subscriber workers, waits until all are connected, drives the
publisher (or, with ``--idle``, waits for the server's memory to settle; with
``--broadcast K``, lets it settle, watches the node idle, then publishes K messages one
at a time), collects the workers' counts and returns the result as a dict:
deliveries/s, latency percentiles, loss and reordering, the server's CPU and the
generator's (see report.render). The server's CPU and RSS are its processes' together
(a supervisor's workers included).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from .broadcast import finite, time_to_last_ms
from .counting import WorkerResult
from .publisher import broadcast, drive, warm_up
from .report import percentile
from .serverstats import cpu_pids, cpu_sum, node_pids, parse_cpus, rss_sum_kib, workers_of
from .spawn import spawn_node
from .target import Target, parse_target, sub_targets
from .workers import CONNS_PER_IP, CONNS_PER_PROCESS, WorkerSpec, run_loop, worker


def _affinity(spec: str | None) -> set[int] | None:
    if spec is None or not hasattr(os, "sched_setaffinity"):
        return None
    return set(parse_cpus(spec)) or None


def _rss(server_pid: int | None) -> int | None:
    """The node's resident memory, KiB: its processes' together (a supervisor's workers)."""
    return rss_sum_kib(node_pids(server_pid))


def _window(args: argparse.Namespace) -> str:
    """``--window``: every (the default) or probe (namespaces built without the flag)."""
    return str(getattr(args, "window", None) or "every")


def _default_sample(args: argparse.Namespace) -> int:
    """Sampled subscribers: a few at saturation (their decoding costs generator CPU);
    up to 1,000 at a fixed rate and in a broadcast, where the per-message cost is small
    and p99 needs samples from all along the fan-out order."""
    if args.sample is not None:
        return int(args.sample)
    n = int(args.subscribers)
    if args.rate or _broadcast(args):
        return min(n, 1000)
    # at most 1% of the deliveries: with 50 subscribers and ~60k publishes/s, 10 decoding
    # subscribers alone saturated the generator's core (measured)
    return max(1, min(10, n // 100))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one benchmark; return the result as a dict."""
    node = None
    server_pid: int | None = getattr(args, "server_pid", None)
    if args.url is not None and args.peer is not None:
        raise SystemExit("fastim bench: give --url or --peer, not both")
    if args.url is not None:
        target = parse_target(args.url)
    elif args.peer is not None:
        target = parse_target(args.peer, peer=True)
    else:
        workdir = tempfile.mkdtemp(prefix="fastim-bench-")
        node, target = spawn_node(
            args.transport,
            args.server_cpu,
            args.store,
            workdir,
            _server_workers(args),
            shlex.split(getattr(args, "server_flags", None) or ""),
        )
        server_pid = node.pid
    try:
        result = _run(target, args, server_pid)
        if node is not None:
            result["store"] = args.store
            result["server_workers"] = _server_workers(args)
        elif server_pid is not None:
            result["server_workers"] = len(workers_of(server_pid)) or 1
        else:
            result["server_workers"] = None
        return result
    finally:
        if node is not None:
            node.terminate()
            try:
                node.wait(10)
            except subprocess.TimeoutExpired:
                node.kill()
            shutil.rmtree(workdir, ignore_errors=True)


def _server_workers(args: argparse.Namespace) -> int:
    """``--server-workers`` (1 for namespaces built without the flag)."""
    return int(getattr(args, "server_workers", None) or 1)


def _broadcast(args: argparse.Namespace) -> int:
    """``--broadcast K``: K messages (0: not a broadcast run)."""
    return int(getattr(args, "broadcast", None) or 0)


def _run(target: Target, args: argparse.Namespace, server_pid: int | None) -> dict[str, Any]:
    idle = bool(args.idle)
    bcast = _broadcast(args)
    progress = not args.json and not args.quiet
    n_total = args.subscribers
    # the probe, in the publisher's process, is one of the N subscribers
    n_workers_conns = n_total if idle else n_total - 1
    procs = max(1, args.processes, math.ceil(n_workers_conns / CONNS_PER_PROCESS))
    spread = args.spread_ips or n_total > CONNS_PER_IP
    share = [
        n_workers_conns // procs + (1 if i < n_workers_conns % procs else 0) for i in range(procs)
    ]
    n_sample = 0 if idle else _default_sample(args)
    subscribe = not (idle and args.no_subscribe) and target.fastim
    sub_nodes = sub_targets(args, target)
    cpus = _affinity(args.client_cpu)
    if cpus:
        os.sched_setaffinity(0, cpus)
    if progress:
        what = (
            "idle connections"
            if idle
            else f"broadcast of {bcast} messages, {args.broadcast_gap:g}s apart"
            if bcast
            else (
                f"{args.rate:g} msg/s"
                if args.rate
                else f"saturation (≤{args.inflight} in flight, window: {_window(args)})"
            )
        )
        print(
            f"fastim bench → {target.url} ({target.kind}): {n_total:,} connections in "
            f"{procs} process(es), {args.size}-byte messages, {what}"
            + ("" if idle or bcast else f", {args.duration:g}s"),
            file=sys.stderr,
        )
    rss_before = None
    if (idle or bcast) and server_pid is not None:
        run_loop(warm_up(target, args.channel, min(20, n_total), subscribe))
        rss_before = _rss(server_pid)
    ctx = _mp_context()
    pipes: list[Connection] = []
    workers = []
    samples_left = n_sample
    for i, n in enumerate(share):
        a, b = ctx.Pipe()
        k = min(n, math.ceil(samples_left / (procs - i))) if n_sample else 0
        samples_left -= k
        spec = WorkerSpec(
            target,
            args.channel,
            n,
            k,
            subscribe,
            (1 + i * 8) if spread else 0,
            sub_nodes,
            report_min=not idle and not bcast and _window(args) == "every",
            broadcast=bcast,
        )
        p = ctx.Process(target=worker, args=(spec, b), daemon=True)
        p.start()
        if cpus and p.pid:
            os.sched_setaffinity(p.pid, cpus)
        pipes.append(a)
        workers.append(p)
    try:
        return _measure(
            target, args, server_pid, pipes, share, progress, idle, rss_before, n_sample, procs
        )
    finally:
        for p in workers:
            p.join(5)
            if p.is_alive():
                p.terminate()


def _mp_context() -> Any:
    """forkserver with the bench preloaded (the workers' module, and so the package): a
    worker starts in ~10 ms instead of ~200 ms (peers_e2e.py starts dozens); spawn where
    forkserver does not exist."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:  # pragma: no cover - not on Linux
        return mp.get_context("spawn")
    ctx.set_forkserver_preload([worker.__module__])
    return ctx


def _collect(pipes: list[Connection], timeout: float) -> list[WorkerResult]:
    out: list[WorkerResult] = []
    for a in pipes:
        if not a.poll(timeout):
            raise SystemExit("fastim bench: a worker did not report its result")
        msg = a.recv()
        # "min": --window every's late reports; "reached": --broadcast's
        while msg[0] in ("progress", "min", "reached"):
            msg = a.recv()
        if msg[0] != "result":
            raise SystemExit(f"fastim bench: worker failed: {msg[1]}")
        out.append(WorkerResult(**msg[1]))
    return out


def _measure(
    target: Target,
    args: argparse.Namespace,
    server_pid: int | None,
    pipes: list[Connection],
    share: list[int],
    progress: bool,
    idle: bool,
    rss_before: int | None,
    n_sample: int,
    procs: int,
) -> dict[str, Any]:
    n_total = args.subscribers
    counts = [0] * len(pipes)
    waiting = {id(a): i for i, a in enumerate(pipes)}
    t_conn = time.monotonic()
    while waiting:
        for a in wait([pipes[i] for i in waiting.values()], timeout=60):
            i = waiting[id(a)]
            msg = pipes[i].recv()
            if msg[0] == "progress":
                counts[i] = msg[1]
            elif msg[0] == "ready":
                counts[i] = msg[1]
                del waiting[id(a)]
            else:
                raise SystemExit(f"fastim bench: worker failed: {msg[1]}")
        if time.monotonic() - t_conn > 600:
            raise SystemExit("fastim bench: connecting took more than 10 minutes")
        if progress:
            print(
                f"\r  connected {sum(counts):,}/{sum(share):,}", end="", file=sys.stderr, flush=True
            )
    connect_s = time.monotonic() - t_conn
    if progress:
        print(f"  ({connect_s:.1f}s)", file=sys.stderr)
    out: dict[str, Any] = {
        "target": target.kind,
        "url": target.url,
        "sub_urls": [t.url for t in sub_targets(args, target)] or None,
        "subscribers": n_total,
        "connect_s": round(connect_s, 2),
    }
    gen_cpu0 = time.process_time()
    if idle:
        return _idle(out, args, server_pid, pipes, rss_before, progress)
    if _broadcast(args):
        return _bcast(out, target, args, server_pid, pipes, share, rss_before, progress, procs)
    args.window = _window(args)
    pub = run_loop(drive(target, args, pipes, server_pid, progress, share))
    pub_cpu = time.process_time() - gen_cpu0
    for a in pipes:
        a.send(("expect", pub.published, args.drain))
    results = _collect(pipes, args.drain + 30)
    sent = pub.published
    received = sum(r.received for r in results) + pub.probe_received
    expected = sent * n_total
    lat = [x for r in results for x in r.latencies_us]
    elapsed = max(pub.elapsed_s, 1e-9)
    per_proc = [round(100 * r.cpu_s / r.wall_s, 1) if r.wall_s else 0.0 for r in results]
    per_proc_sys = [round(100 * r.sys_s / r.wall_s, 1) if r.wall_s else 0.0 for r in results]
    pub_pct = round(100 * pub_cpu / elapsed, 1)
    n_cores = len(_affinity(args.client_cpu) or os.sched_getaffinity(0))
    total_pct = round(sum(per_proc) + pub_pct, 1)
    closed = sum(r.closed for r in results)
    errors = [e for r in results for e in r.errors] + pub.errors
    if closed:
        errors.insert(0, f"the server closed {closed} subscriber connections during the run")
    out.update(
        {
            "size": args.size,
            "mode": "rate" if args.rate else "saturation",
            "rate": args.rate,
            "inflight": args.inflight,
            # W counted against every subscriber (the workers' reports and the probe) or
            # against the probe alone; min_reports: the workers' reports read while publishing
            "window": args.window,
            "min_reports": pub.min_reports if args.window == "every" else None,
            "duration_s": round(elapsed, 3),
            # the last message any subscriber received, after the probe's last: near 0
            # (or below) when the generator kept up, large when its own sockets queued
            "subscribers_lag_s": round(
                max([r.last_rx for r in results] or [pub.probe_last_rx]) - pub.probe_last_rx, 3
            ),
            "published": sent,
            "acked": pub.acked if target.fastim else None,
            # the node that welcomed the publisher: on a node of several workers, its worker
            "publisher_node": pub.node,
            "publish_per_s": round(sent / elapsed, 1),
            "deliveries": received,
            "deliveries_expected": expected,
            "deliveries_per_s": round(received / elapsed, 1),
            "lost": max(0, expected - received),
            "per_conn_min": min([r.per_conn_min for r in results if r.connections] or [0]),
            "reordered": sum(r.reordered for r in results),
            "duplicates": sum(r.duplicates for r in results),
            "latency_us": {
                "samples": len(lat),
                "sampled_subscribers": sum(r.sampled for r in results),
                "p50": round(percentile(lat, 50), 1),
                "p90": round(percentile(lat, 90), 1),
                "p99": round(percentile(lat, 99), 1),
                "max": round(max(lat), 1) if lat else None,
            },
            "server": {
                "pid": server_pid,
                "cpu_pids": cpu_pids(args, server_pid),
                # CPU-seconds of the server's processes while publishing, and their share
                # of the wall clock (above 100% on several cores)
                "cpu_s": round(pub.server_cpu_s, 3) if pub.server_cpu_s is not None else None,
                "cpu_pct": round(100 * pub.server_cpu_s / elapsed, 1)
                if pub.server_cpu_s is not None
                else None,
                "rss_kib": _rss(server_pid),
            },
            # what one CPU-second of the server delivers (the cost, whatever the cores)
            "deliveries_per_server_cpu_s": round(received / pub.server_cpu_s, 1)
            if pub.server_cpu_s
            else None,
            "generator": {
                "processes": procs,
                "cores": n_cores,
                "worker_cpu_pct": per_proc,
                "worker_sys_pct": per_proc_sys,
                "worker_cpu_max_pct": max(per_proc) if per_proc else 0.0,
                "publisher_cpu_pct": pub_pct,
                "total_cpu_pct": total_pct,
                "load_pct_of_cores": round(total_pct / n_cores, 1),
            },
            "errors": errors[:20],
        }
    )
    return out


def _settle(server_pid: int | None, settle: float, progress: bool) -> tuple[int | None, float]:
    """Wait (``settle`` seconds at most) until the node's RSS is steady; (RSS KiB, wait)."""
    t0 = time.monotonic()
    pids = node_pids(server_pid)
    prev = rss_sum_kib(pids)
    steady = 0
    while pids and time.monotonic() - t0 < settle:
        time.sleep(0.25)
        cur = rss_sum_kib(pids)
        if cur is None or prev is None:
            break
        # steady: three readings in a row within 0.2% (or 64 KiB) of each other
        steady = steady + 1 if abs(cur - prev) <= max(64, prev // 500) else 0
        prev = cur
        if progress:
            print(f"\r  settling: server RSS {cur:,} KiB", end="", file=sys.stderr, flush=True)
        if steady >= 3:
            break
    if progress:
        print(file=sys.stderr)
    return _rss(server_pid), time.monotonic() - t0


def _idle(
    out: dict[str, Any],
    args: argparse.Namespace,
    server_pid: int | None,
    pipes: list[Connection],
    rss_before: int | None,
    progress: bool,
) -> dict[str, Any]:
    """Hold the connections until the server's RSS is steady; report its growth."""
    rss_after, settle_s = _settle(server_pid, args.settle, progress)
    for a in pipes:
        a.send(("stop",))
    results = _collect(pipes, 60)
    n = sum(r.connections for r in results)
    errors = [e for r in results for e in r.errors]
    closed = sum(r.closed for r in results)
    if closed:
        errors.insert(0, f"the server closed {closed} idle connections")
    per_conn = None
    if rss_before is not None and rss_after is not None and n:
        per_conn = round((rss_after - rss_before) * 1024 / n, 1)
    out.update(
        {
            "mode": "idle",
            "subscribed": not args.no_subscribe and out["target"] != "peer",
            "connections": n,
            "server": {
                "pid": server_pid,
                "processes": len(node_pids(server_pid)),
                "rss_before_kib": rss_before,
                "rss_after_kib": rss_after,
                "rss_growth_bytes_per_conn": per_conn,
            },
            "settle_s": round(settle_s, 2),
            "errors": errors[:20],
        }
    )
    if server_pid is None:
        out["errors"].append("server pid unknown (--server-pid): RSS not measured")
    return out


def _marks(pipes: list[Connection]) -> tuple[int, int]:
    """Every worker's heartbeat pings answered so far and its connections the server
    closed, summed."""
    for a in pipes:
        a.send(("mark",))
    pings = closed = 0
    for a in pipes:
        if not a.poll(30):
            raise SystemExit("fastim bench: a worker did not answer")
        msg = a.recv()
        while msg[0] in ("progress", "min"):
            msg = a.recv()
        if msg[0] != "mark":
            raise SystemExit(f"fastim bench: worker failed: {msg[1]}")
        pings += int(msg[1]["pings"])
        closed += int(msg[1]["closed"])
    return pings, closed


def _bcast(
    out: dict[str, Any],
    target: Target,
    args: argparse.Namespace,
    server_pid: int | None,
    pipes: list[Connection],
    share: list[int],
    rss_before: int | None,
    progress: bool,
    procs: int,
) -> dict[str, Any]:
    """``--broadcast K``: settle, watch the node idle, publish K messages one at a time
    (publisher.broadcast), then check that every connection got each exactly once."""
    k = _broadcast(args)
    n_total = args.subscribers
    n_conns = sum(share) + 1  # the probe, in this process
    pids = node_pids(server_pid)
    rss_after, settle_s = (None, 0.0)
    if server_pid is not None and args.settle > 0:
        rss_after, settle_s = _settle(server_pid, args.settle, progress)
    else:
        rss_after = _rss(server_pid)
    # the node idle, every connection open, heartbeats flowing: its CPU, the pings
    window = float(getattr(args, "idle_window", 0.0) or 0.0)
    pings0, _closed0 = _marks(pipes)
    idle_cpu_pct = None
    if window > 0:
        cpu0 = cpu_sum(pids)
        t0 = time.monotonic()
        while (left := t0 + window - time.monotonic()) > 0:
            if progress:
                print(f"\r  idle: {left:4.1f}s left", end="", file=sys.stderr, flush=True)
            time.sleep(min(1.0, left))
        cpu1 = cpu_sum(pids)
        took = time.monotonic() - t0
        if cpu0 is not None and cpu1 is not None:
            idle_cpu_pct = round(100 * (cpu1 - cpu0) / took, 2)
        if progress:
            print(f"\r  idle {took:.1f}s: server CPU {idle_cpu_pct}%", file=sys.stderr)
    pings1, closed_idle = _marks(pipes)
    gen_cpu0 = time.process_time()
    run = run_loop(broadcast(target, args, pipes, share, pids, progress))
    pub_cpu = time.process_time() - gen_cpu0
    for a in pipes:
        a.send(("expect", k, args.drain))
    results = _collect(pipes, args.drain + 30)
    parts = [*results, run.probe]
    ttl, reached = time_to_last_ms(k, run.t_pub_ns, parts)
    ttl_ok = finite(ttl)
    first = [
        min(
            (
                p.bcast_first_ns[j]
                for p in parts
                if len(p.bcast_first_ns) > j and p.bcast_first_ns[j]
            ),
            default=0,
        )
        for j in range(k)
    ]
    ttf = [
        round((f - run.t_pub_ns[j]) / 1e6, 3) if f and j < len(run.t_pub_ns) else None
        for j, f in enumerate(first)
    ]
    lat = [x for r in results for x in r.latencies_us]
    exact = sum(p.conns_exact for p in parts)
    over = sum(p.conns_over for p in parts)
    received = sum(r.received for r in results) + run.probe.received
    closed = sum(r.closed for r in results)
    errors = [e for r in results for e in r.errors] + run.errors
    if closed:
        errors.insert(0, f"the server closed {closed} subscriber connections")
    if run.published < k:
        errors.append(f"published {run.published} of {k} messages")
    once = exact == n_conns and all(x == n_conns for x in reached) and run.published == k
    if not once:
        errors.append(
            f"not exactly once: {exact:,} of {n_conns:,} connections got each of the {k} "
            f"messages once ({over:,} more than {k}, {n_conns - exact - over:,} fewer)"
        )
    elapsed = max(run.elapsed_s, 1e-9)
    per_proc = [round(100 * r.cpu_s / r.wall_s, 1) if r.wall_s else 0.0 for r in results]
    n_cores = len(_affinity(args.client_cpu) or os.sched_getaffinity(0))
    pub_pct = round(100 * pub_cpu / elapsed, 1)
    out.update(
        {
            "mode": "broadcast",
            "size": args.size,
            "published": run.published,
            "acked": run.acked if target.fastim else None,
            "publisher_node": run.node,
            "broadcast": {
                "messages": k,
                "gap_s": args.broadcast_gap,
                # per message: publish → the last of all N subscribers has it, ms
                "time_to_last_ms": ttl,
                "time_to_first_ms": ttf,
                "reached": reached,
                "p50_ms": round(percentile(ttl_ok, 50), 3) if ttl_ok else None,
                "p99_ms": round(percentile(ttl_ok, 99), 3) if ttl_ok else None,
                "max_ms": max(ttl_ok) if ttl_ok else None,
            },
            "exactly_once": once,
            "connections_exact": exact,
            "connections_over": over,
            "deliveries": received,
            "deliveries_expected": k * n_total,
            "lost": max(0, k * n_total - received),
            "per_conn_min": min([p.per_conn_min for p in parts if p.connections] or [0]),
            "per_conn_max": max([p.per_conn_max for p in parts if p.connections] or [0]),
            "reordered": sum(r.reordered for r in results),
            "duplicates": sum(r.duplicates for r in results) + over,
            "latency_us": {
                "samples": len(lat),
                "sampled_subscribers": sum(r.sampled for r in results),
                "p50": round(percentile(lat, 50), 1),
                "p90": round(percentile(lat, 90), 1),
                "p99": round(percentile(lat, 99), 1),
                "max": round(max(lat), 1) if lat else None,
            },
            "server": {
                "pid": server_pid,
                "processes": len(pids),
                "cpu_pids": pids,
                "rss_before_kib": rss_before,
                "rss_kib": rss_after,
                # the node's memory (all its processes) per connection, and its growth
                # from before the connections were opened
                "rss_bytes_per_conn": round(rss_after * 1024 / n_conns, 1)
                if rss_after is not None
                else None,
                "rss_growth_bytes_per_conn": round((rss_after - rss_before) * 1024 / n_conns, 1)
                if rss_after is not None and rss_before is not None
                else None,
                "idle_window_s": window,
                "idle_cpu_pct": idle_cpu_pct,
                "broadcast_cpu_s": round(run.server_cpu_s, 3)
                if run.server_cpu_s is not None
                else None,
            },
            "heartbeats": {
                # pings the subscribers answered (a pong each): during the idle window,
                # and over the whole run
                "pings_idle_window": pings1 - pings0,
                "pings": sum(r.pings for r in results) + run.probe.pings,
                "closed_by_server_idle": closed_idle,
            },
            "settle_s": round(settle_s, 2),
            "duration_s": round(elapsed, 3),
            "generator": {
                "processes": procs,
                "cores": n_cores,
                "worker_cpu_pct": per_proc,
                "worker_cpu_max_pct": max(per_proc) if per_proc else 0.0,
                "publisher_cpu_pct": pub_pct,
            },
            "errors": errors[:20],
        }
    )
    return out
