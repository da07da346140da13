"""TLS on both listeners, with certificates made by the test (a private CA, the `cryptography`
package): the SDK over tls:// and wss://, the `websockets` library, a plain client against
a TLS port, client certificates, and the node's direct socket writes staying off."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fastim.client import connect
from fastim.client.connection import open_connection, parse_url
from fastim.config import Config, ConfigError
from fastim.protocol import FrameType, pack_hello

from ._support import Closed, T, TcpClient, deadline, wait_for_sessions

F = FrameType
SECRET = "tls-test-secret-tls-test-secret-0123456789"


# --------------------------------------------------------------------------- certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    """A certificate with the extensions strict verifiers (Python 3.13) ask for."""
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signer = issuer[1] if issuer else key
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
        )
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    else:
        b = b.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
        )
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), False)
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            False,
        )
    return b.sign(signer, hashes.SHA256())


@dataclass
class Pki:
    ca: str  # the CA that signed the server's and the good client's certificates
    cert: str
    key: str
    client_cert: str
    client_key: str
    rogue_cert: str  # a client certificate signed by another CA
    rogue_key: str

    def client_context(self, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca)
        if cert is not None:
            ctx.load_cert_chain(cert, key)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    files: dict[str, str] = {}

    def write(name: str, data: bytes) -> str:
        path = d / name
        path.write_bytes(data)
        files[name] = str(path)
        return str(path)

    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("fastim test CA", ca_key, None, ca=True)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = _cert("another CA", other_key, None, ca=True)
    made = {}
    for name, issuer, server in (
        ("server", (ca, ca_key), True),
        ("client", (ca, ca_key), False),
        ("rogue", (other_ca, other_key), False),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"{name}.test", key, issuer, server=server)
        made[name] = (
            write(f"{name}.pem", cert.public_bytes(pem)),
            write(f"{name}.key", _pem_key(key)),
        )
    return Pki(
        ca=write("ca.pem", ca.public_bytes(pem)),
        cert=made["server"][0],
        key=made["server"][1],
        client_cert=made["client"][0],
        client_key=made["client"][1],
        rogue_cert=made["rogue"][0],
        rogue_key=made["rogue"][1],
    )


async def tls_tcp(port: int, ctx: ssl.SSLContext) -> TcpClient:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), T)
    return TcpClient(reader, writer)


# --------------------------------------------------------------------------- round trips


async def test_sdk_over_tls_and_wss(
    node_factory: Any, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await node_factory(tls_cert=pki.cert, tls_key=pki.key)
    assert node.urls() == [
        f"tls://127.0.0.1:{node.tcp_port}",
        f"wss://127.0.0.1:{node.ws_port}/ws",
    ]
    # the SDK uses the system's trust store: point it at the test CA
    monkeypatch.setenv("SSL_CERT_FILE", pki.ca)
    async with deadline(15):
        tls = await connect(f"tls://127.0.0.1:{node.tcp_port}", reconnect=False)
        wss = await connect(f"wss://127.0.0.1:{node.ws_port}/ws", reconnect=False)
        on_tls = await tls.subscribe("news")
        on_wss = await wss.subscribe("news")
        big = {"blob": "x" * 300_000}  # many TLS records, written through the transport
        offsets = [await wss.publish("news", {"n": i}) for i in range(50)]
        offsets.append(await tls.publish("news", big))
        for sub in (on_tls, on_wss):
            got = [await sub.get() for _ in offsets]
            assert [m.offset for m in got] == offsets
            assert got[-1].data == big
        # TLS transports transform the bytes: the compiled core must not write to the socket
        assert len(node.sessions) == 2
        assert all(s.ring.direct_fd == -1 for s in node.sessions)
        await tls.aclose()
        await wss.aclose()


async def test_direct_write_is_on_for_plain_sockets(node_factory: Any) -> None:
    """The other side of the check above: the same session code does use the socket."""
    node = await node_factory()
    c = await TcpClient.connect(node.tcp_port)
    async with deadline(5):
        await wait_for_sessions(node, 1)
        assert all(s.ring.direct_fd >= 0 for s in node.sessions)
    await c.close()


async def test_raw_tls_client_and_explicit_context(node_factory: Any, pki: Pki) -> None:
    node = await node_factory(tls_cert=pki.cert, tls_key=pki.key)
    async with deadline(10):
        c = await tls_tcp(node.tcp_port, pki.client_context())
        await c.hello()
        assert await c.sub("x") == 0
        assert await c.pub("x", b"1") == 1
        assert await c.msg() == (1, "x", b"1")
        await c.close()
        # fastim.client.connection takes a context of the caller's (a private CA)
        conn = await open_connection(f"tls://127.0.0.1:{node.tcp_port}", ssl=pki.client_context())
        conn.write(_hello_frame())
        frames: list[tuple[int, bytes]] = []
        while not frames:
            frames = await conn.read_frames()
        assert frames[0][0] == F.WELCOME
        await conn.close()
        # and refuses a server its trust store does not know
        with pytest.raises(ssl.SSLCertVerificationError):
            await open_connection(f"tls://127.0.0.1:{node.tcp_port}")


def _hello_frame() -> bytes:
    from fastim import _core

    return _core.encode_frame(F.HELLO, pack_hello(1, 1))


async def test_wss_with_the_websockets_library_and_a_token(node_factory: Any, pki: Pki) -> None:
    node = await node_factory(tls_cert=pki.cert, tls_key=pki.key, jwt_secret=SECRET)
    tok = jwt.encode({"sub": "wanda", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    url = f"wss://127.0.0.1:{node.ws_port}/ws?token={tok}"
    async with deadline(10), websockets.connect(url, ssl=pki.client_context()) as ws:
        await ws.send(orjson.dumps({"op": "sub", "ch": "room:1", "id": 1}).decode())
        assert orjson.loads(await ws.recv())["op"] == "subscribed"
        await ws.send(orjson.dumps({"op": "pub", "ch": "room:1", "data": "hi", "id": 2}).decode())
        replies = [orjson.loads(await ws.recv()) for _ in range(2)]
        assert sorted(r["op"] for r in replies) == ["msg", "puback"]
        await ws.send(orjson.dumps({"op": "presence", "ch": "room:1", "id": 3}).decode())
        assert orjson.loads(await ws.recv())["users"] == ["wanda"]


# --------------------------------------------------------------------------- refusals


async def test_plain_clients_on_a_tls_port_are_refused_cleanly(node_factory: Any, pki: Pki) -> None:
    node = await node_factory(tls_cert=pki.cert, tls_key=pki.key)
    async with deadline(15):
        for port, hello in (
            (node.tcp_port, _hello_frame()),
            (node.ws_port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(hello)
            got = b""
            try:
                while chunk := await asyncio.wait_for(reader.read(65536), T):
                    got += chunk
            except ConnectionResetError:
                pass
            # at most a TLS alert record (content type 21), never a fastim or HTTP answer
            assert got == b"" or got[0] == 21, got[:40]
            writer.close()
        await wait_for_sessions(node, 0)
        # the node keeps serving TLS clients
        c = await tls_tcp(node.tcp_port, pki.client_context())
        await c.hello()
        await c.close()


async def test_a_silent_client_is_dropped_after_the_handshake_timeout(
    node_factory: Any, pki: Pki
) -> None:
    node = await node_factory(tls_cert=pki.cert, tls_key=pki.key, handshake_timeout=0.5)
    async with deadline(10):
        # ssl_handshake_timeout: a TCP connection that never starts TLS is dropped
        reader, writer = await asyncio.open_connection("127.0.0.1", node.tcp_port)
        t0 = time.monotonic()
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionResetError:
            pass
        assert 0.3 < time.monotonic() - t0 < 4
        writer.close()


async def _refused(port: int, ctx: ssl.SSLContext) -> None:
    """The node refuses the TLS client: handshake error, reset, or EOF before WELCOME."""
    # TLS 1.3 finishes the client's side of the handshake before the server has looked
    # at the client's certificate: the refusal may only show on the first read
    with pytest.raises((ssl.SSLError, ConnectionError, Closed)):
        c = await tls_tcp(port, ctx)
        c.send(F.HELLO, pack_hello(1, 1))
        t, _ = await c.recv()
        raise AssertionError(f"expected a refusal, got frame 0x{t:02x}")


async def test_client_certificates_when_tls_client_ca_is_set(node_factory: Any, pki: Pki) -> None:
    node = await node_factory(tls_cert=pki.cert, tls_key=pki.key, tls_client_ca=pki.ca)
    async with deadline(15):
        c = await tls_tcp(node.tcp_port, pki.client_context(pki.client_cert, pki.client_key))
        await c.hello()
        assert await c.sub("peers") == 0
        peer = c.writer.get_extra_info("ssl_object")
        assert peer is not None and peer.version() in ("TLSv1.2", "TLSv1.3")
        await c.close()
        await _refused(node.tcp_port, pki.client_context())  # no certificate
        await _refused(node.tcp_port, pki.client_context(pki.rogue_cert, pki.rogue_key))
        await _refused(node.ws_port, pki.client_context())
        ok = pki.client_context(pki.client_cert, pki.client_key)
        async with websockets.connect(f"wss://127.0.0.1:{node.ws_port}/ws", ssl=ok) as ws:
            await ws.send('{"op":"ping","id":1}')
            assert orjson.loads(await ws.recv()) == {"op": "pong", "id": 1}


# --------------------------------------------------------------------------- settings


def test_tls_settings_are_checked_at_start(pki: Pki, tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tls_cert": pki.cert}, "tls_cert and tls_key: set both"),
        ({"tls_key": pki.key}, "tls_cert and tls_key: set both"),
        ({"tls_client_ca": pki.ca}, "tls_client_ca: needs tls_cert"),
        ({"tls_cert": str(tmp_path / "none.pem"), "tls_key": pki.key}, "no such file"),
        ({"tls_cert": pki.cert, "tls_key": pki.client_key}, "cannot load"),
        (
            {"tls_cert": pki.cert, "tls_key": pki.key, "tls_client_ca": str(tmp_path / "x")},
            "tls_client_ca: no such file",
        ),
    ]
    for settings, needle in cases:
        with pytest.raises(ConfigError) as e:
            Config(**settings).validate()
        assert needle in str(e.value), (settings, str(e.value))
    Config(tls_cert=pki.cert, tls_key=pki.key, tls_client_ca=pki.ca).validate()


def test_sdk_urls() -> None:
    ep = parse_url("tls://example.com:7443")
    assert (ep.scheme, ep.host, ep.port, ep.path, ep.tls) == ("tls", "example.com", 7443, "/", True)
    assert parse_url("wss://example.com/ws?token=abc").path == "/ws?token=abc"
    assert not parse_url("tcp://h:1").tls
    with pytest.raises(ValueError, match="needs a port"):
        parse_url("tls://example.com")
