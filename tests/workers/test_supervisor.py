"""``fastim serve --workers N``: the supervisor (docs/workers.md), with real processes.

Each test starts ``python -m fastim serve --workers ...`` in a directory of its own on
free loopback ports and watches it from outside, as an operator would: its log, its
``supervisor.json`` (:func:`fastim.workers.supervisor.read_state`), ``/proc`` (which
process is whose child, which process holds which connection) and signals. Every wait
is bounded.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastim.cli import main
from fastim.config import Config, ConfigError, build, load
from fastim.workers.role import STATE_FILE
from fastim.workers.supervisor import read_state


class Supervised:
    """One ``fastim serve --workers ...`` process, its log in a file."""

    def __init__(self, cwd: Path, *args: str, workers: str = "2", **popen: Any) -> None:
        self.cwd = cwd
        self.tcp_port = free_port()
        self.ws_port = free_port()
        n = len(list(cwd.glob("supervisor-*.log")))
        self.log_path = cwd / f"supervisor-{n}.log"
        cmd = [
            sys.executable, "-m", "fastim", "serve",
            "--workers", workers,
            "--tcp-port", str(self.tcp_port),
            "--ws-port", str(self.ws_port),
            "--node-id", "sup-test",
            *args,
        ]  # fmt: skip
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                **popen,
            )
        self.directory = ""
        self.seen_pids: set[int] = set()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Until the node's "listening ... (N workers)" line; its state then."""
        eventually(lambda: self._exited() or "workers)" in self.log(), timeout, "listening")
        assert self.proc.poll() is None, f"exited with {self.proc.returncode}:\n{self.log()}"
        m = re.search(r"state in (\S+)/" + re.escape(STATE_FILE), self.log())
        assert m, self.log()
        self.directory = m.group(1)
        return self.state()

    def _exited(self) -> bool:
        return self.proc.poll() is not None

    def state(self) -> dict[str, Any]:
        state = read_state(self.directory)
        self.seen_pids |= {w["pid"] for w in state["workers"] if w["pid"]}
        return state

    def pids(self) -> list[int]:
        return [w["pid"] for w in self.state()["workers"]]

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s:\n{self.log()}") from None

    def cleanup(self) -> None:
        """SIGTERM (SIGKILL after 20 s), then SIGKILL any worker of its left running."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in self.seen_pids:
            if self.is_worker(pid) and alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)  # the supervisor's, if killed

    def is_worker(self, pid: int) -> bool:
        """``pid`` is one of this supervisor's workers (its role names the directory)."""
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return bool(self.directory) and f'"dir":"{self.directory}"'.encode() in environ


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    started: list[Supervised] = []

    def start(*args: str, **kw: Any) -> Supervised:
        s = Supervised(tmp_path, *args, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.cleanup()


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def eventually(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: [state, ppid, ...]; None when gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Running or stopped; not gone, not a zombie."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def gone(pid: int) -> bool:
    """Exited and reaped by its parent: every thread has exited, every file is closed
    (a zombie thread-group leader may still wait for its other threads, which hold the
    listening sockets)."""
    return _stat(pid) is None


def is_child_of(pid: int, parent: int) -> bool:
    st = _stat(pid)
    return st is not None and int(st[1]) == parent


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and is_child_of(int(entry), pid):
            out.append(int(entry))
    return out


def _server_inodes(port: int) -> set[str]:
    """Socket inodes of the established connections whose local port is ``port``."""
    out: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                out.add(inode)
    return out


def _socket_inodes(pid: int) -> set[str]:
    out: set[str] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def connections_per_process(port: int, pids: list[int]) -> dict[int, int]:
    """How many accepted connections on ``port`` each process holds."""
    server = _server_inodes(port)
    return {pid: len(_socket_inodes(pid) & server) for pid in pids}


def health(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    finally:
        conn.close()


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# ------------------------------------------------------------------------------- tests


def test_two_workers_share_the_ports(supervised: Callable[..., Supervised]) -> None:
    sup = supervised("--store", "memory")
    state = sup.wait_ready()
    assert state["pid"] == sup.proc.pid
    assert [w["index"] for w in state["workers"]] == [0, 1]
    assert all(w["ready"] for w in state["workers"]), state
    assert (state["restarts_total"], state["hangs_total"]) == (0, 0)
    pids = sup.pids()
    assert len(set(pids)) == 2
    assert sorted(children(sup.proc.pid)) == sorted(pids), "the workers are its children"
    assert [children(p) for p in pids] == [[], []], "a worker supervises nothing"
    assert os.stat(sup.directory).st_mode & 0o777 == 0o700
    # the supervisor stays small: neither the compiled core nor uvloop is loaded in it
    maps = Path(f"/proc/{sup.proc.pid}/maps").read_text()
    assert "_core" not in maps and "uvloop" not in maps
    worker_maps = Path(f"/proc/{pids[0]}/maps").read_text()
    assert "_core" in worker_maps and "uvloop" in worker_maps
    assert "fastim node sup-test listening: " in sup.log()
    assert f"tcp://127.0.0.1:{sup.tcp_port} ws://127.0.0.1:{sup.ws_port}/ws (2 workers)" in (
        sup.log()
    )
    # 40 connections to the one TCP port: the kernel spreads them over both workers
    clients = [socket.create_connection(("127.0.0.1", sup.tcp_port), 5) for _ in range(40)]
    try:
        held = eventually(
            lambda: (
                (c := connections_per_process(sup.tcp_port, pids)) and sum(c.values()) == 40 and c
            ),
            10,
            "40 connections accepted by the workers",
        )
        assert all(n > 0 for n in held.values()), held
    finally:
        for c in clients:
            c.close()
    assert health(sup.ws_port) == 200


def test_a_worker_killed_is_restarted(supervised: Callable[..., Supervised]) -> None:
    sup = supervised("--store", "memory")
    sup.wait_ready()
    old = sup.pids()
    os.kill(old[0], signal.SIGKILL)
    eventually(lambda: gone(old[0]), 10, "worker 0 dead and reaped")
    # the other worker holds the ports meanwhile: the node keeps answering
    assert all(health(sup.ws_port) == 200 for _ in range(10))
    state = eventually(
        lambda: (
            (s := sup.state())["workers"][0]["pid"] not in (None, old[0])
            and s["workers"][0]["ready"]
            and s
        ),
        15,
        "worker 0 restarted and ready",
    )
    w0, w1 = state["workers"]
    assert (w0["restarts"], w0["hangs"], state["restarts_total"], state["hangs_total"]) == (
        1,
        0,
        1,
        0,
    )
    assert w1["pid"] == old[1] and w1["restarts"] == 0, "the other worker was left alone"
    assert is_child_of(w0["pid"], sup.proc.pid)
    died = f"WARNING fastim: worker w0 (pid {old[0]}) died: killed by signal SIGKILL"
    assert died in sup.log(), sup.log()
    with socket.create_connection(("127.0.0.1", sup.tcp_port), 5):
        pass
    assert health(sup.ws_port) == 200
    assert sup.proc.poll() is None


def test_restarts_back_off(supervised: Callable[..., Supervised]) -> None:
    """The same worker dying again and again waits 0.1 s, then twice as long each time,
    at most worker_restart_backoff."""
    sup = supervised("--store", "memory", "--worker-restart-backoff", "0.3")
    sup.wait_ready()
    for n in (1, 2, 3):
        pid = sup.pids()[1]
        os.kill(pid, signal.SIGKILL)

        def restarted(n: int = n) -> bool:
            w = sup.state()["workers"][1]
            return bool(w["restarts"] == n and w["ready"])

        eventually(restarted, 15, f"restart {n} of worker 1")
    waits = re.findall(r"worker w1 \(pid \d+\) died: .*; restarting it in ([0-9.]+) s", sup.log())
    assert waits == ["0.1", "0.2", "0.3"], sup.log()
    assert sup.state()["restarts_total"] == 3


def test_backoff_is_reset_by_a_worker_that_stayed_up() -> None:
    from fastim.workers.supervisor import FIRST_BACKOFF, STABLE_AFTER, _Worker

    w = _Worker(0)
    assert [w.next_backoff(1.0, 5.0) for _ in range(8)] == [
        0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0,
    ]  # fmt: skip
    assert w.next_backoff(STABLE_AFTER, 5.0) == FIRST_BACKOFF
    assert w.next_backoff(0.5, 5.0) == 0.2


def test_a_stopped_worker_is_killed_and_replaced(supervised: Callable[..., Supervised]) -> None:
    """SIGSTOP: the process is there, its loop does not turn, it pings no more."""
    sup = supervised("--store", "memory", "--worker-hang-timeout", "1.5")
    sup.wait_ready()
    old = sup.pids()
    os.kill(old[1], signal.SIGSTOP)
    t0 = time.monotonic()
    state = eventually(
        lambda: (
            (s := sup.state())["workers"][1]["pid"] not in (None, old[1])
            and s["workers"][1]["ready"]
            and s
        ),
        1.5 + 10,
        "the stopped worker replaced",
    )
    took = time.monotonic() - t0
    assert took >= 1.5, took
    w0, w1 = state["workers"]
    assert (w1["hangs"], w1["restarts"], state["hangs_total"], state["restarts_total"]) == (
        1,
        0,
        1,
        0,
    )
    assert w0["pid"] == old[0]
    assert gone(old[1]), "the stopped worker was killed (SIGKILL) and reaped"
    assert f"worker w1 (pid {old[1]}) silent for" in sup.log()
    assert health(sup.ws_port) == 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_stops_every_worker(
    supervised: Callable[..., Supervised], sig: signal.Signals
) -> None:
    sup = supervised("--store", "memory")
    sup.wait_ready()
    pids = sup.pids()
    directory = sup.directory
    clients = [socket.create_connection(("127.0.0.1", sup.tcp_port), 5) for _ in range(4)]
    sup.proc.send_signal(sig)
    assert sup.wait_exit(30) == 0, sup.log()
    for c in clients:
        c.close()
    assert not any(alive(p) for p in pids), "no worker outlives the supervisor"
    assert not os.path.exists(directory), "the workers' directory is removed"
    assert port_is_free(sup.tcp_port) and port_is_free(sup.ws_port)
    log = sup.log()
    assert f"{sig.name}, stopping 2 workers" in log
    assert log.count("stopped: exit status 0") == 2, log
    assert "fastim node sup-test stopped (2 workers)" in log


def test_a_worker_that_does_not_stop_is_killed(supervised: Callable[..., Supervised]) -> None:
    """SIGTERM to the supervisor while a worker is stopped (SIGSTOP): after
    shutdown_timeout + 10 s that worker is killed, and the exit status says so."""
    sup = supervised("--store", "memory", "--shutdown-timeout", "0.5")
    sup.wait_ready()
    pids = sup.pids()
    os.kill(pids[0], signal.SIGSTOP)
    t0 = time.monotonic()
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.wait_exit(30) == 1, sup.log()
    took = time.monotonic() - t0
    assert 10.5 <= took < 20, took
    assert f"worker w0 (pid {pids[0]}) still running 10 s after SIGTERM: SIGKILL" in sup.log()
    assert f"worker w0 (pid {pids[0]}) stopped: killed by signal SIGKILL" in sup.log()
    assert f"worker w1 (pid {pids[1]}) stopped: exit status 0" in sup.log()
    assert not any(alive(p) for p in pids)


def test_workers_stop_when_the_supervisor_is_killed(
    supervised: Callable[..., Supervised],
) -> None:
    """kill -9 of the supervisor: each worker finds its ping pipe closed and stops,
    releasing the ports, instead of serving on, orphaned."""
    sup = supervised("--store", "memory")
    sup.wait_ready()
    pids = sup.pids()
    sup.proc.kill()
    sup.proc.wait(10)
    eventually(lambda: not any(alive(p) for p in pids), 15, "the workers exited")
    assert "the supervisor is gone" in sup.log()
    eventually(lambda: port_is_free(sup.tcp_port), 5, "the port released")


def test_a_worker_that_cannot_start_fails_the_node(
    supervised: Callable[..., Supervised],
) -> None:
    """No restart loop at start: a worker that exits before it was ever ready (here its
    store is unreachable) stops the others, and the supervisor exits with its status."""
    sup = supervised(
        "--store", "redis", "--redis-url", f"redis://127.0.0.1:{free_port()}/0",
        "--redis-timeout", "0.5",
    )  # fmt: skip
    assert sup.wait_exit(30) == 1
    log = sup.log()
    assert "cannot open the store" in log
    assert "exited before it was ready (exit status 1): the node does not start" in log
    assert "workers)" not in log and "restarting" not in log


def test_a_second_node_on_the_same_ports_fails(supervised: Callable[..., Supervised]) -> None:
    """Another supervisor (its workers would share the first one's SO_REUSEPORT group)
    is refused the ports, as a single node would be."""
    first = supervised("--store", "memory")
    first.wait_ready()
    second = subprocess.run(
        [
            sys.executable, "-m", "fastim", "serve", "--workers", "2", "--store", "memory",
            "--tcp-port", str(first.tcp_port), "--ws-port", str(first.ws_port),
        ],
        capture_output=True, text=True, timeout=60, cwd=first.cwd,
    )  # fmt: skip
    assert second.returncode == 1, second.stderr
    assert (
        f"cannot listen: tcp_port {first.tcp_port} on host '127.0.0.1': "
        f"127.0.0.1:{first.tcp_port}: Address already in use" in second.stderr
    ), second.stderr
    assert "starting" not in second.stderr, "no worker was started"
    assert health(first.ws_port) == 200 and first.proc.poll() is None


def test_the_sqlite_lock_of_a_single_node_stops_a_supervisor(
    tmp_path: Path, node_process: Any
) -> None:
    """A node on fastim.db holds its lock: `--workers 2` on the same file fails at once
    with the single node's line and status, before starting any worker."""
    single = node_process()  # the defaults: sqlite, fastim.db in a directory of its own
    directory = Path(os.readlink(f"/proc/{single.proc.pid}/cwd"))
    r = subprocess.run(
        [
            sys.executable, "-m", "fastim", "serve", "--workers", "2",
            "--tcp-port", str(free_port()), "--ws-port", str(free_port()),
        ],
        capture_output=True, text=True, timeout=60, cwd=directory,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert (
        "fastim: cannot open the store: sqlite store fastim.db: open failed: database is in "
        "use by another process (lock fastim.db.lock)" in r.stderr
    ), r.stderr
    assert "starting" not in r.stderr
    assert single.terminate() == 0


def test_a_supervisor_holds_the_sqlite_lock_for_its_workers(
    supervised: Callable[..., Supervised], tmp_path: Path
) -> None:
    """The default store: the workers share fastim.db under the supervisor's lock; another
    `fastim serve`, with workers or without, fails on the file with the lock message."""
    sup = supervised()  # no store flag: sqlite, fastim.db in tmp_path
    sup.wait_ready()
    assert (tmp_path / "fastim.db").exists()
    message = "database is in use by another process (lock fastim.db.lock)"
    for workers in (["--workers", "2"], []):
        r = subprocess.run(
            [
                sys.executable, "-m", "fastim", "serve", *workers,
                "--tcp-port", str(free_port()), "--ws-port", str(free_port()),
            ],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert r.returncode == 1, r.stderr
        assert "cannot open the store" in r.stderr and message in r.stderr, r.stderr
    assert health(sup.ws_port) == 200
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.wait_exit(30) == 0, sup.log()
    # the lock is released with the supervisor: a single node takes the file
    single = subprocess.Popen(
        [
            sys.executable, "-m", "fastim", "serve",
            "--tcp-port", str(free_port()), "--ws-port", str(free_port()),
        ],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert single.stdout is not None
        line = ""
        deadline = time.monotonic() + 30
        while "listening" not in line and time.monotonic() < deadline:
            line = single.stdout.readline()
            assert line, "the single node exited"
    finally:
        single.terminate()
        single.communicate(timeout=30)


def test_auto_is_one_worker_per_cpu(supervised: Callable[..., Supervised]) -> None:
    """`--workers auto` counts the CPUs the process may run on: pinned to two, two (on a
    one-CPU machine: one, which is a single node without supervisor)."""
    cpus = sorted(os.sched_getaffinity(0))
    assert Config(workers="auto").validate().worker_count() == len(cpus)
    if len(cpus) < 2:
        assert Config(workers="auto").validate().worker_count() == 1
        return
    two = set(cpus[:2])
    sup = supervised(
        "--store", "memory", workers="auto", preexec_fn=lambda: os.sched_setaffinity(0, two)
    )
    state = sup.wait_ready()
    assert len(state["workers"]) == 2
    assert "(2 workers)" in sup.log()
    assert Config(workers="auto").validate().worker_count() == len(os.sched_getaffinity(0))


def test_one_worker_is_a_single_node(node_process: Any) -> None:
    """The default, workers = 1: no supervisor, no other process."""
    p = node_process("--workers", "1")
    assert children(p.proc.pid) == []
    assert "workers)" not in "".join(p.log)
    assert p.terminate() == 0


WORKERS_MUST = "workers: must be a number of processes (1..256) or 'auto', got"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "0"], f"{WORKERS_MUST} 0"),
        (["--workers", "x"], f"{WORKERS_MUST} 'x'"),
        (["--workers", "-2"], f"{WORKERS_MUST} '-2'"),
        (["--workers", "2", "--worker-hang-timeout", "0.5"], "worker_hang_timeout: must be >= 1"),
        (["--workers", "2", "--worker-restart-backoff", "0"], "worker_restart_backoff: must be"),
    ],
)
def test_bad_worker_settings_are_named(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert f"fastim: bad configuration: {message}" in err, err


def test_worker_settings_from_the_file_and_the_environment(tmp_path: Path) -> None:
    p = tmp_path / "f.toml"
    p.write_text('workers = "auto"\nworker_hang_timeout = 2\n')
    cfg = build(p)
    assert (cfg.workers, cfg.worker_hang_timeout, cfg.worker_restart_backoff) == ("auto", 2, 5.0)
    p.write_text("workers = 3\n")
    assert build(p).worker_count() == 3
    assert load(None, {"FASTIM_WORKERS": "4"}, {}).workers == 4
    assert load(None, {"FASTIM_WORKERS": "4"}, {"workers": "2"}).workers == 2  # flag wins
    assert Config().validate().worker_count() == 1
    p.write_text("workers = 0\n")
    with pytest.raises(ConfigError, match="workers: must be"):
        build(p)
    p.write_text("workers = 1.5\n")
    with pytest.raises(ConfigError, match=re.escape("workers: expected int | str")):
        build(p)
    with pytest.raises(ConfigError, match=re.escape(f"{WORKERS_MUST} 'many'")):
        load(None, {"FASTIM_WORKERS": "many"}, {})
