"""The parent process of ``fastim serve --workers N`` (docs/workers.md).

It serves no client itself and stays small: no event loop but asyncio's own, no node,
no store opened. It

- holds what must outlive any one worker: the node's ports (a socket bound with
  ``SO_REUSEPORT`` on each, never listening: it receives no connection but keeps the
  port for the node while workers come and go), the sqlite store's file lock (the
  workers share the file, ``store_locked`` in their role), and a private directory
  (mode 0700) for the workers' sockets and ``supervisor.json``;
- starts the workers, ``python -m fastim serve <the same flags>`` with their
  :class:`~fastim.workers.role.WorkerRole` in ``_FASTIM_WORKER`` and the write end of a
  pipe each: a worker writes ``R`` once it serves, then ``.`` every
  :data:`~fastim.workers.role.PING_EVERY` seconds (:mod:`fastim.workers.worker`);
- says the node listens once every worker has written ``R``; a worker that exits before
  it was ever ready fails the start (the others are stopped, the supervisor exits with
  that worker's status: no restart loop on a bad configuration);
- restarts a worker that dies (same index, same role), after a backoff that starts at
  0.1 s and doubles up to ``worker_restart_backoff`` (back to 0.1 s once a worker has
  stayed up :data:`STABLE_AFTER` seconds); kills with SIGKILL and restarts a ready
  worker silent on its pipe for ``worker_hang_timeout`` (a hang);
- on SIGTERM or SIGINT stops restarting, sends SIGTERM to every worker and waits for
  them (at most ``shutdown_timeout`` + :data:`STOP_GRACE` seconds, then SIGKILL): exit
  status 0 when they all stopped by themselves, 1 otherwise.

Its state, for the workers' metrics and for operators: ``<directory>/supervisor.json``,
rewritten atomically on every change, read with :func:`read_state`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ..config import Config, ConfigError
from .role import ENV, STATE_FILE, WorkerRole, worker_name

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("fastim")

#: the first wait before a dead worker is started again; it doubles per death
FIRST_BACKOFF = 0.1
#: seconds a worker must stay up for its next restart to wait FIRST_BACKOFF again
STABLE_AFTER = 10.0
#: seconds the workers get beyond shutdown_timeout to exit after SIGTERM
STOP_GRACE = 10.0


def read_state(directory: str) -> dict[str, Any]:
    """The supervisor's state in ``directory`` (a worker's ``role.directory``):
    ``{"pid", "workers": [{"index", "pid", "started_at", "restarts", "hangs", "ready"}],
    "restarts_total", "hangs_total"}``. The file is replaced atomically, never seen half
    written; OSError when there is none (the supervisor has not started or is gone)."""
    with open(os.path.join(directory, STATE_FILE), "rb") as fh:
        state: dict[str, Any] = orjson.loads(fh.read())
    return state


def describe_exit(returncode: int) -> str:
    """``exit status 1`` or ``killed by signal SIGKILL``: what a worker's end was."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exit status {returncode}"


def exit_status(returncode: int) -> int:
    """A child's return code as this process's exit status (128 + N for signal N)."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class _Worker:
    """One worker slot: the index and counters stay, the process changes."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    ping_fd: int = -1  # the read end of its ping pipe
    started_at: float = 0.0  # time.time() of the current process's start
    started_mono: float = 0.0
    last_ping: float = 0.0  # monotonic
    ready: bool = False
    ever_ready: bool = False  # some process of this slot wrote R
    restarts: int = 0  # deaths after being ready, hangs not counted
    hangs: int = 0  # killed for silence
    hung: bool = False  # the current process was killed for silence
    backoff: float = FIRST_BACKOFF
    pending: asyncio.TimerHandle | None = None  # a restart waiting for its backoff

    @property
    def name(self) -> str:
        return worker_name(self.index)

    def next_backoff(self, uptime: float, longest: float) -> float:
        """The wait before this slot's next process, its previous one having been up
        ``uptime`` seconds: FIRST_BACKOFF, doubling per death up to ``longest``, and
        FIRST_BACKOFF again after a process that stayed up STABLE_AFTER seconds."""
        if uptime >= STABLE_AFTER:
            self.backoff = FIRST_BACKOFF
        delay = min(self.backoff, longest)
        self.backoff = min(self.backoff * 2, longest)
        return delay

    @property
    def pid(self) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return None
        return self.proc.pid


class Supervisor:
    """``Supervisor(config, argv).run()``: the process ``fastim serve`` becomes when
    ``workers`` asks for more than one. ``argv``: the flags ``serve`` was given (the
    workers get them, and the concrete ports and node id after them: flags win)."""

    def __init__(self, config: Config, argv: Sequence[str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.count = 1
        self.directory = ""
        self.store_locked = False
        self._lock_fd: int | None = None
        self._reserved: list[socket.socket] = []
        self._ports: dict[str, int] = {}
        self.workers: list[_Worker] = []
        self.restarts_total = 0
        self.hangs_total = 0
        self.ready = False  # every worker has been ready once: the node listens
        self.stopping = False
        self._unclean = False  # a worker did not stop by itself, with status 0
        self._exit_code: int | None = None  # a failed start: the worker's status
        self._done: asyncio.Future[int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._kill_handle: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------------ lifetime

    def run(self) -> int:
        """Run the node's workers until SIGTERM or SIGINT; the process's exit status."""
        cfg = self.config
        try:
            cfg.validate()
            self.count = cfg.worker_count()
        except ConfigError as e:
            print(f"fastim: bad configuration: {e}", file=sys.stderr)
            return 2
        try:
            if cfg.store == "sqlite":
                try:
                    self._lock_store(cfg.store_path)
                except OSError as e:
                    # as a single node says it (fastim.store.sqlite): the same line, status
                    log.error(
                        "fastim: cannot open the store: sqlite store %s: open failed: %s",
                        cfg.store_path,
                        e,
                    )
                    return 1
                self.store_locked = True
            try:
                self._reserve_ports()
            except OSError as e:
                log.error("fastim: cannot listen: %s", e.strerror or e)
                return 1
            self.directory = tempfile.mkdtemp(prefix="fastim-")  # mode 0700
            try:
                return asyncio.run(self._main())
            finally:
                self._kill_all()
                shutil.rmtree(self.directory, ignore_errors=True)
        finally:
            for sock in self._reserved:
                sock.close()
            self._reserved.clear()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        self.workers = [_Worker(i) for i in range(self.count)]
        log.info(
            "supervisor (pid %d): starting %d workers; state in %s",
            os.getpid(),
            self.count,
            os.path.join(self.directory, STATE_FILE),
        )
        try:
            for w in self.workers:
                if not self.stopping:
                    self._spawn(w)
            self._tick()
            return await self._done
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                loop.remove_signal_handler(sig)
            for handle in (self._tick_handle, self._kill_handle):
                if handle is not None:
                    handle.cancel()
            for w in self.workers:
                self._close_pipe(w)
                if w.pending is not None:
                    w.pending.cancel()

    # ------------------------------------------------------------ what outlives workers

    def _lock_store(self, path: str) -> None:
        """The sqlite store's lock file, as :class:`fastim.store.sqlite.SqliteStore`
        takes it: held for the node's life, so another node on the file fails at start."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OSError(f"database is in use by another process (lock {path}.lock)") from None
        self._lock_fd = fd

    def _reserve_ports(self) -> None:
        """Bind (never listen) a socket on each address of each enabled port.

        First a plain bind (``SO_REUSEADDR`` only, as a single node binds) checks that
        nobody holds the port: a reservation alone would share it with another
        supervisor's ``SO_REUSEPORT`` sockets. Then the reservation, with
        ``SO_REUSEPORT`` and without ``SO_REUSEADDR``, so that while no worker listens a
        single node cannot bind there either (with ``SO_REUSEADDR`` it could: the port
        is bound, not listening). Only connections left in TIME_WAIT by an earlier
        process without ``SO_REUSEPORT`` make it fall back to both options.
        """
        cfg = self.config
        for setting in ("tcp_port", "ws_port"):
            port: int = getattr(cfg, setting)
            if not port:
                continue  # 0: that listener is off
            try:
                infos = socket.getaddrinfo(
                    cfg.host or None,
                    port,
                    socket.AF_UNSPEC,
                    socket.SOCK_STREAM,
                    0,
                    socket.AI_PASSIVE,
                )
            except socket.gaierror as e:
                raise OSError(
                    e.errno, f"{setting} {port} on host {cfg.host!r}: {e.strerror}"
                ) from e
            seen = set()
            for family, type_, proto, _, addr in infos:
                if (family, addr) in seen:
                    continue
                seen.add((family, addr))
                try:
                    with self._socket(
                        family, type_, proto, reuse_address=True, reuse_port=False
                    ) as probe:
                        probe.bind(addr)
                    sock = self._socket(family, type_, proto, reuse_address=False, reuse_port=True)
                    try:
                        sock.bind(addr)
                    except OSError as e:
                        sock.close()
                        if e.errno != errno.EADDRINUSE:
                            raise
                        sock = self._socket(
                            family, type_, proto, reuse_address=True, reuse_port=True
                        )
                        try:
                            sock.bind(addr)
                        except OSError:
                            sock.close()
                            raise
                except OSError as e:
                    raise _listen_error(setting, port, cfg.host, e) from e
                self._reserved.append(sock)
            self._ports[setting] = port

    @staticmethod
    def _socket(
        family: int, type_: int, proto: int, *, reuse_address: bool, reuse_port: bool
    ) -> socket.socket:
        sock = socket.socket(family, type_, proto)
        try:
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # as asyncio's create_server binds: one socket per family
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        except BaseException:
            sock.close()
            raise
        return sock

    # ------------------------------------------------------------------------- workers

    def worker_argv(self) -> list[str]:
        """``serve`` and its flags as given, then the concrete ports and node id."""
        out = ["serve", *self.argv]
        for setting, port in self._ports.items():
            out += ["--" + setting.replace("_", "-"), str(port)]
        out += ["--node-id", self.config.node_id]
        return out

    def _spawn(self, w: _Worker) -> None:
        """Start slot ``w``'s process (its first or a new one)."""
        w.pending = None
        if self.stopping:
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        role = WorkerRole(
            w.index, self.count, self.directory, ping_fd=write_fd, store_locked=self.store_locked
        )
        env = dict(os.environ)
        env[ENV] = role.to_env()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fastim", *self.worker_argv()],
                env=env,
                stdin=subprocess.DEVNULL,
                pass_fds=(write_fd,),
            )
        except OSError as e:
            os.close(read_fd)
            log.error("fastim: cannot start worker %s: %s", w.name, e)
            if not w.ever_ready:
                self._fail_start(1)
            else:
                w.started_mono = time.monotonic()  # an attempt that lasted no time
                self._schedule_restart(w)
            return
        finally:
            os.close(write_fd)  # the worker's copy is the only one: EOF when it exits
        w.proc = proc
        w.ping_fd = read_fd
        w.started_at = time.time()
        w.started_mono = w.last_ping = time.monotonic()
        w.ready = False
        w.hung = False
        assert self._loop is not None
        self._loop.add_reader(read_fd, self._on_ping, w)
        log.debug("worker %s started (pid %d)", w.name, proc.pid)
        self._write_state()

    def _on_ping(self, w: _Worker) -> None:
        try:
            data = os.read(w.ping_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the worker closed its end: it exits (or has): _reap tells
            self._close_pipe(w)
            return
        w.last_ping = time.monotonic()
        if not w.ready and b"R" in data:
            w.ready = True
            w.ever_ready = True
            if self.ready:
                log.info("worker %s ready (pid %s)", w.name, w.pid)
            self._write_state()
            if not self.ready and all(x.ready for x in self.workers):
                self.ready = True
                log.info(
                    "fastim node %s listening: %s (%d workers)",
                    self.config.node_id,
                    " ".join(self.urls()),
                    self.count,
                )

    def _close_pipe(self, w: _Worker) -> None:
        if w.ping_fd >= 0:
            if self._loop is not None:
                self._loop.remove_reader(w.ping_fd)
            os.close(w.ping_fd)
            w.ping_fd = -1

    def _reap(self) -> None:
        """SIGCHLD (and every tick): handle each worker that has exited."""
        for w in self.workers:
            if w.proc is None or w.proc.returncode is not None:
                continue  # not started, or its end was handled
            returncode = w.proc.poll()
            if returncode is not None:
                self._on_exit(w, returncode)

    def _on_exit(self, w: _Worker, returncode: int) -> None:
        if w.ping_fd >= 0:
            self._on_ping(w)  # an R it wrote just before dying still counts
        self._close_pipe(w)
        pid = w.proc.pid if w.proc is not None else "?"
        was_ready = w.ready
        w.ready = False
        how = describe_exit(returncode)
        if self.stopping:
            log.info("worker %s (pid %s) stopped: %s", w.name, pid, how)
            if returncode != 0:
                self._unclean = True
            self._write_state()
            self._maybe_done()
            return
        if not w.ever_ready:
            log.error(
                "worker %s (pid %s) exited before it was ready (%s): the node does not start",
                w.name,
                pid,
                how,
            )
            self._write_state()
            self._fail_start(exit_status(returncode) or 1)
            return
        if w.hung:
            w.hangs += 1
            self.hangs_total += 1
        else:
            w.restarts += 1
            self.restarts_total += 1
        delay = self._schedule_restart(w)
        if not w.hung:
            log.warning(
                "worker %s (pid %s) %s: %s; restarting it in %.1f s (restarts: %d)",
                w.name,
                pid,
                "died" if was_ready else "died before it was ready",
                how,
                delay,
                w.restarts,
            )
        else:
            log.warning(
                "worker %s (pid %s) killed for not answering; restarting it in %.1f s (hangs: %d)",
                w.name,
                pid,
                delay,
                w.hangs,
            )
        self._write_state()

    def _schedule_restart(self, w: _Worker) -> float:
        """Start slot ``w`` again after its backoff; the wait, in seconds."""
        assert self._loop is not None
        uptime = time.monotonic() - w.started_mono if w.started_mono else 0.0
        delay = w.next_backoff(uptime, self.config.worker_restart_backoff)
        w.pending = self._loop.call_later(delay, self._spawn, w)
        return delay

    def _tick(self) -> None:
        """Every quarter of the hang timeout (at most 0.25 s): reap, find the silent."""
        assert self._loop is not None
        self._reap()
        if not self.stopping:
            now = time.monotonic()
            timeout = self.config.worker_hang_timeout
            for w in self.workers:
                if w.ready and not w.hung and w.pid is not None and now - w.last_ping > timeout:
                    log.warning(
                        "worker %s (pid %d) silent for %.1f s (worker_hang_timeout "
                        "%.1f): killing it (SIGKILL)",
                        w.name,
                        w.pid,
                        now - w.last_ping,
                        timeout,
                    )
                    w.hung = True
                    self._signal(w, signal.SIGKILL)
        self._tick_handle = self._loop.call_later(
            min(0.25, self.config.worker_hang_timeout / 4), self._tick
        )

    # ------------------------------------------------------------------------ stopping

    def _on_signal(self, sig: int) -> None:
        if self.stopping:
            log.info("%s again: still waiting for the workers", signal.Signals(sig).name)
            return
        log.info(
            "fastim node %s: %s, stopping %d workers",
            self.config.node_id,
            signal.Signals(sig).name,
            self.count,
        )
        self._stop()

    def _fail_start(self, code: int) -> None:
        if self._exit_code is None:
            self._exit_code = code
        self._stop()

    def _stop(self) -> None:
        """Stop restarting, SIGTERM every worker, SIGKILL what is left after the grace."""
        if self.stopping:
            return
        self.stopping = True
        assert self._loop is not None
        for w in self.workers:
            if w.pending is not None:
                w.pending.cancel()
                w.pending = None
            self._signal(w, signal.SIGTERM)
        grace = self.config.shutdown_timeout + STOP_GRACE
        self._kill_handle = self._loop.call_later(grace, self._kill_rest, grace)
        self._write_state()
        self._maybe_done()

    def _kill_rest(self, grace: float) -> None:
        for w in self.workers:
            if w.pid is not None:
                log.warning(
                    "worker %s (pid %d) still running %.0f s after SIGTERM: SIGKILL",
                    w.name,
                    w.pid,
                    grace,
                )
                self._unclean = True
                self._signal(w, signal.SIGKILL)

    def _maybe_done(self) -> None:
        if self._done is None or self._done.done():
            return
        if any(w.pid is not None for w in self.workers):
            return
        if self._exit_code is not None:
            code = self._exit_code
        else:
            code = 1 if self._unclean else 0
            log.info("fastim node %s stopped (%d workers)", self.config.node_id, self.count)
        self._done.set_result(code)

    @staticmethod
    def _signal(w: _Worker, sig: int) -> None:
        if w.proc is not None and w.proc.returncode is None:
            try:
                w.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def _kill_all(self) -> None:
        """Whatever happened: no worker outlives the supervisor."""
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                self._signal(w, signal.SIGKILL)
                try:
                    w.proc.wait(5)
                except subprocess.TimeoutExpired:  # pragma: no cover - the kernel's business
                    pass

    # --------------------------------------------------------------------- observation

    def urls(self) -> list[str]:
        """The node's URLs, as a single node logs them."""
        cfg = self.config
        tcp, ws = ("tls", "wss") if cfg.tls_cert else ("tcp", "ws")
        out = []
        if cfg.tcp_port:
            out.append(f"{tcp}://{cfg.host}:{cfg.tcp_port}")
        if cfg.ws_port:
            out.append(f"{ws}://{cfg.host}:{cfg.ws_port}{cfg.ws_path}")
            if cfg.ws_echo_path:
                out.append(f"{ws}://{cfg.host}:{cfg.ws_port}{cfg.ws_echo_path} (echo)")
        return out

    def state(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "workers": [
                {
                    "index": w.index,
                    "pid": w.pid,
                    "started_at": w.started_at,
                    "restarts": w.restarts,
                    "hangs": w.hangs,
                    "ready": w.ready,
                }
                for w in self.workers
            ],
            "restarts_total": self.restarts_total,
            "hangs_total": self.hangs_total,
        }

    def _write_state(self) -> None:
        """``supervisor.json``, replaced atomically (a reader sees the old or the new)."""
        path = os.path.join(self.directory, STATE_FILE)
        tmp = path + ".tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(orjson.dumps(self.state()))
            os.replace(tmp, path)
        except OSError as e:  # pragma: no cover - the directory is ours
            log.warning("cannot write %s: %s", path, e)


def _listen_error(setting: str, port: int, host: str, e: OSError) -> OSError:
    """The error a single node gives for a port it cannot bind (fastim.node)."""
    shown = f"[{host}]" if ":" in host else host
    why = {
        errno.EADDRINUSE: f"another process listens there: change {setting}",
        errno.EADDRNOTAVAIL: "no interface of this machine has that address: change host",
        errno.EACCES: "ports below 1024 need privileges (CAP_NET_BIND_SERVICE)",
    }.get(e.errno or 0, "")
    what = os.strerror(e.errno) if e.errno else str(e)
    msg = f"{setting} {port} on host {host!r}: {shown}:{port}: {what}"
    return OSError(e.errno, msg + (f" ({why})" if why else ""))
