"""Settings: defaults, file, flags, validation that names the bad key."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from fastim.cli import main
from fastim.config import Config, ConfigError, build

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_defaults_bind_loopback_and_validate() -> None:
    c = Config().validate()
    assert c.host == "127.0.0.1"
    assert (c.tcp_port, c.ws_port, c.ws_path, c.ws_echo_path) == (7070, 7071, "/ws", "")


def test_file_then_overrides(tmp_path: Path) -> None:
    p = tmp_path / "f.toml"
    p.write_text('tcp_port = 9000\nping_interval = 3\nws_echo_path = "/echo"\n')
    c = build(p, tcp_port=9001, ws_port=None)
    assert c.tcp_port == 9001  # flag beats file
    assert c.ping_interval == 3  # file beats default
    assert c.ws_port == 7071  # None = not given
    assert c.ws_echo_path == "/echo"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("tcp_prot = 1\n", "unknown setting 'tcp_prot'"),
        ('tcp_port = "x"\n', "tcp_port: expected int"),
        ("tcp_port = 70000\n", "tcp_port: must be 0..65535"),
        ("ping_interval = 0\n", "ping_interval: must be > 0"),
        ('ws_path = "ws"\n', "ws_path: must start with '/'"),
        ("tcp_port = 0\nws_port = 0\n", "both 0"),
        ("max_frame = [1]\n", "max_frame: expected int"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_file_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        build(p)
    assert needle in str(e.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        build("/nonexistent/fastim.toml")


def test_cli_refuses_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("pong_timeout = -1\n")
    assert main(["serve", "--config", str(p)]) == 2
    assert "pong_timeout: must be > 0" in capsys.readouterr().err


def test_every_setting_is_documented_and_has_a_flag() -> None:
    doc = DOCS.read_text()
    for f in fields(Config):
        assert f"`{f.name}`" in doc, f"{f.name} missing from docs/configuration.md"
        if not f.metadata.get("file_only"):
            assert f"`--{f.name.replace('_', '-')}`" in doc
    assert os.path.exists(DOCS)


# --------------------------------------------------------------------------- environment


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    from fastim.config import load

    p = tmp_path / "f.toml"
    p.write_text("tcp_port = 1111\nws_port = 2222\nping_interval = 5.0\n")
    env = {"FASTIM_WS_PORT": "3333", "FASTIM_PING_INTERVAL": "7.5", "PATH": "/bin"}
    cfg = load(p, env, {"tcp_port": None, "ping_interval": 9.0})
    assert (cfg.tcp_port, cfg.ws_port, cfg.ping_interval) == (1111, 3333, 9.0)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FASTIM_TCP_PORT": "seventy"}, "FASTIM_TCP_PORT: expected int, got 'seventy'"),
        ({"FASTIM_TCP_PROT": "1"}, "FASTIM_TCP_PROT: no such setting"),
        ({"FASTIM_PONG_TIMEOUT": "-1"}, "pong_timeout: must be > 0"),
    ],
)
def test_bad_environment_is_named(env: dict[str, str], message: str) -> None:
    from fastim.config import load

    with pytest.raises(ConfigError) as e:
        load(None, env, {})
    assert message in str(e.value)


def test_build_switches_are_not_settings() -> None:
    from fastim.config import load

    assert load(None, {"FASTIM_DEBUG": "1"}, {}).tcp_port == 7070


def test_config_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        'store = "redis"\nredis_url = "redis://app:hunter2@10.0.0.5:6379/0"\n'
        "[namespaces.room]\njoin_leave = true\n"
    )
    assert main(["config", "check", str(good)]) == 0
    out = capsys.readouterr()
    assert "ok" in out.err
    assert "hunter2" not in out.out and "redis://app:***@10.0.0.5:6379/0" in out.out
    assert "'room': {'join_leave': True}" in out.out
    bad = tmp_path / "bad.toml"
    bad.write_text("[namespaces.room]\njoin_leave = 3\n")
    assert main(["config", "check", str(bad)]) == 2
    assert "namespaces.room.join_leave: expected bool, got 3" in capsys.readouterr().err


def test_serve_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FASTIM_MAX_FRAME", "-3")
    assert main(["serve"]) == 2
    assert "max_frame: must be >= 1, got -3" in capsys.readouterr().err


def test_serve_without_its_store_exits_with_a_clear_message() -> None:
    import subprocess
    import sys

    from server._support import free_port  # type: ignore[import-not-found]

    r = subprocess.run(
        [
            sys.executable, "-m", "fastim", "serve",
            "--tcp-port", str(free_port()), "--ws-port", "0",
            "--store", "redis", "--redis-url", "redis://u:pw@127.0.0.1:1/0",
            "--redis-timeout", "0.5",
        ],
        capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert r.returncode == 1
    assert "cannot open the store" in r.stderr and "Traceback" not in r.stderr
    assert "pw" not in r.stderr.replace("pwd", "")


# --------------------------------------------------------------------------- P8: operator


def test_unknown_environment_variable_is_a_warning_at_start(
    monkeypatch: pytest.MonkeyPatch, node_process: Any
) -> None:
    """Wrappers and images set FASTIM_* variables of their own: a node starts anyway,
    and says which setting a typo was probably meant to be."""
    monkeypatch.setenv("FASTIM_BIN", "/usr/bin/x")
    monkeypatch.setenv("FASTIM_PING_INTERVALL", "3")
    p = node_process()
    log = "".join(p.log)
    assert "FASTIM_BIN: no such setting, ignored" in log
    assert (
        "FASTIM_PING_INTERVALL: no such setting, ignored (did you mean FASTIM_PING_INTERVAL?)"
        in log
    )
    assert p.terminate() == 0


def test_unknown_environment_variable_fails_config_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.toml"
    good.write_text("tcp_port = 7070\n")
    monkeypatch.setenv("FASTIM_TCP_PROT", "1")
    assert main(["config", "check", str(good)]) == 2
    err = capsys.readouterr().err
    assert "FASTIM_TCP_PROT: no such setting (did you mean FASTIM_TCP_PORT?)" in err


def test_known_environment_variable_with_a_bad_value_still_stops_the_node(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FASTIM_BIN", "/usr/bin/x")  # only a warning...
    monkeypatch.setenv("FASTIM_TCP_PORT", "seventy")  # ...but this is an error
    assert main(["serve"]) == 2
    assert "FASTIM_TCP_PORT: expected int, got 'seventy'" in capsys.readouterr().err


def _fastim_without(module: str, *argv: str, timeout: float = 30) -> Any:
    """Run ``fastim ARGV`` in a real process in which ``module`` cannot be imported (as
    when an extra was not installed): returns the CompletedProcess."""
    import subprocess
    import sys

    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from fastim.cli import main\n"
        f"raise SystemExit(main({list(argv)!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, timeout=timeout,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("module", "args", "setting", "extra"),
    [
        ("redis", ["--store", "redis"], "store", "fastim[redis]"),
        ("aetcd", ["--etcd-endpoints", "127.0.0.1:1"], "etcd_endpoints", "fastim[cluster]"),
    ],
)
def test_a_missing_extra_is_one_line_at_start(
    module: str, args: list[str], setting: str, extra: str
) -> None:
    import time

    from server._support import free_port

    t0 = time.monotonic()
    r = _fastim_without(module, "serve", "--tcp-port", str(free_port()), "--ws-port", "0", *args)
    assert time.monotonic() - t0 < 8  # at once, not after an etcd timeout
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # no traceback
    assert f"{setting}:" in lines[0] and f"pip install '{extra}'" in lines[0]


@pytest.mark.parametrize(
    ("module", "text", "setting", "extra"),
    [
        ("redis", 'store = "redis"\n', "store", "fastim[redis]"),
        ("aetcd", 'etcd_endpoints = "10.0.0.1:2379"\n', "etcd_endpoints", "fastim[cluster]"),
    ],
)
def test_config_check_refuses_a_missing_extra(
    tmp_path: Path, module: str, text: str, setting: str, extra: str
) -> None:
    p = tmp_path / "f.toml"
    p.write_text(text)
    r = _fastim_without(module, "config", "check", "-q", str(p))
    assert r.returncode == 2, r.stderr
    assert f"{setting}:" in r.stderr and f"pip install '{extra}'" in r.stderr
    assert "Traceback" not in r.stderr
    # and with the module there, the same file passes
    ok = _fastim_without("no_such_module_anyway", "config", "check", "-q", str(p))
    assert ok.returncode == 0, ok.stderr


def test_a_missing_tls_file_names_the_setting_and_the_path(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not used")
    cert = tmp_path / "cert.pem"
    cert.write_text("not used")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tls_cert": "/nonexistent/cert.pem", "tls_key": str(key)},
         "tls_cert: no such file: '/nonexistent/cert.pem'"),
        ({"tls_cert": str(cert), "tls_key": "/nonexistent/key.pem"},
         "tls_key: no such file: '/nonexistent/key.pem'"),
    ]  # fmt: skip
    for settings, needle in cases:
        with pytest.raises(ConfigError) as e:
            Config(**settings).validate()
        assert needle in str(e.value)
        assert "None" not in str(e.value)


@pytest.mark.parametrize("host", ["999.1.1.1", "10.0.0", "no-such-host.invalid", "a b"])
def test_config_check_refuses_a_host_that_is_no_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    p = tmp_path / "f.toml"
    p.write_text("")
    monkeypatch.setenv("FASTIM_HOST", host)
    assert main(["config", "check", "-q", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"host: {host!r}" in err


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "0.0.0.0", "::", "", "localhost"])
def test_hosts_that_are_addresses_pass(host: str) -> None:
    assert Config(host=host).validate().host == host


def test_a_listen_failure_names_the_setting_and_the_address(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        # in a directory of its own: the default store is a sqlite file in the cwd
        return subprocess.run(
            [sys.executable, "-m", "fastim", "serve", *args],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = serve("--tcp-port", "0", "--ws-port", str(port))
        assert r.returncode == 1, r.stderr
        assert f"ws_port {port}" in r.stderr and f"127.0.0.1:{port}" in r.stderr
        assert "in use" in r.stderr and "Traceback" not in r.stderr
        r = serve("--tcp-port", str(port), "--ws-port", "0")
        assert r.returncode == 1 and f"tcp_port {port}" in r.stderr, r.stderr
    # 192.0.2.1 (TEST-NET-1) is an address, but no interface of this machine has it
    r = serve("--host", "192.0.2.1", "--tcp-port", "0", "--ws-port", str(port))
    assert r.returncode == 1, r.stderr
    assert "host '192.0.2.1'" in r.stderr and "Traceback" not in r.stderr
