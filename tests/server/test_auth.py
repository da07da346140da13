"""Connect tokens (JWT) and channel rules over real sockets, and the verifier on its own.

Tokens are made here with PyJWT: HS256 with a secret, RS256 and ES256 with key pairs
generated per module (only the public half goes to the node, in a PEM file).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fastim import _core
from fastim.auth import Auth, AuthFailed
from fastim.client import connect
from fastim.config import Config, ConfigError, redact
from fastim.protocol import CloseCode, ErrorCode, FrameType, pack_hello, unpack_error

from ._support import TcpClient, WsClient, deadline

F = FrameType
SECRET = "s3cret-s3cret-s3cret-s3cret-0123456789"  # >= 32 bytes (RFC 7518 §3.2)


def token(
    sub: Any = "alice",
    key: Any = SECRET,
    alg: str = "HS256",
    ttl: float = 60,
    **claims: Any,
) -> str:
    body: dict[str, Any] = {"exp": int(time.time() + ttl), **claims}
    if sub is not None:
        body["sub"] = sub
    return jwt.encode(body, key, algorithm=alg)


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def hs256_by_hand(claims: dict[str, Any], key: bytes) -> str:
    """An HS256 token PyJWT would refuse to make (it will not use a PEM as an HMAC key)."""
    signing = _b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + _b64(orjson.dumps(claims))
    return (signing + b"." + _b64(hmac.new(key, signing, hashlib.sha256).digest())).decode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, str]]:
    """alg → (private key, path of the public key PEM)."""
    out: dict[str, tuple[Any, str]] = {}
    d = tmp_path_factory.mktemp("jwt-keys")
    private: dict[str, Any] = {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
    }
    for alg, key in private.items():
        path = d / f"{alg}.pub.pem"
        path.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        out[alg] = (key, str(path))
    return out


# --------------------------------------------------------------------------- helpers


async def tcp_hello(port: int, **options: Any) -> TcpClient:
    """A TCP client that sent HELLO with ``options`` (no wait for the answer)."""
    c = await TcpClient.connect(port, hello=False)
    c.send(F.HELLO, pack_hello(1, 1, orjson.dumps(options)))
    return c


async def tcp_login(port: int, **options: Any) -> tuple[TcpClient, dict[str, Any]]:
    c = await tcp_hello(port, **options)
    p = await c.expect(F.WELCOME)
    info: dict[str, Any] = orjson.loads(p[1:])
    return c, info


async def refused_tcp(c: TcpClient, needle: str) -> None:
    """The server answered AUTH_FAILED naming ``needle``, then GOAWAY 4501 and EOF."""
    code, reason, close_code, _ = await c.expect_error_and_goaway()
    assert (code, close_code) == (ErrorCode.AUTH_FAILED, CloseCode.AUTH_FAILED), reason
    assert needle in reason, reason


async def refused_ws(ws: WsClient, needle: str) -> None:
    """AUTH_FAILED as a JSON error, then close 4501."""
    code, _reason, before = await ws.recv_close()
    assert code == CloseCode.AUTH_FAILED
    errors = [orjson.loads(p) for op, p in before if op == _core.OP_TEXT]
    assert errors and errors[-1]["op"] == "error", before
    assert errors[-1]["code"] == ErrorCode.AUTH_FAILED
    assert needle in errors[-1]["reason"], errors[-1]


async def denied(ws: WsClient, obj: dict[str, Any], needle: str = "") -> dict[str, Any]:
    """The command is refused with PERMISSION_DENIED; the connection stays."""
    reply = await ws.request(obj, "error")
    assert reply["code"] == ErrorCode.PERMISSION_DENIED, reply
    assert needle in reply["reason"], reply
    return reply


# --------------------------------------------------------------------------- tokens


async def test_hs256_token_in_tcp_hello_gives_the_user(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET)
    async with deadline(10):
        c, info = await tcp_login(node.tcp_port, token=token("alice"), client="test")
        assert info["user"] == "alice"
        assert await c.sub("news") == 0
        assert await c.pub("news", b'{"a":1}') == 1
        assert (await c.msg())[1:] == ("news", b'{"a":1}')
        ws = await WsClient.connect(node.ws_port, f"/ws?token={token('bob')}")
        reply = await ws.request({"op": "presence", "ch": "news"}, "presence")
        assert reply["users"] == ["alice"]
        assert node.auth.verified == 2
    await c.close()
    await ws.close()


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_public_key_tokens(node_factory: Any, keys: Any, alg: str) -> None:
    private, path = keys[alg]
    node = await node_factory(jwt_public_key=path)
    async with deadline(10):
        ws = await WsClient.connect(node.ws_port)
        reply = await ws.request({"op": "hello", "token": token("carol", private, alg)}, "welcome")
        assert reply["user"] == "carol"
        assert await ws.sub("room:1") == 0
        # the algorithms follow the key: an HS256 token (even one "signed" with the public
        # key's PEM, the classic confusion) is not looked at
        pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )  # what the node has in jwt_public_key
        forged = hs256_by_hand({"sub": "x", "exp": time.time() + 60}, pem)
        c = await tcp_hello(node.tcp_port, token=forged)
        await refused_tcp(c, "algorithm 'HS256' not accepted")
        other = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if alg == "RS256"
            else ec.generate_private_key(ec.SECP256R1())
        )
        c = await tcp_hello(node.tcp_port, token=token("carol", other, alg))
        await refused_tcp(c, "signature does not verify")
    await ws.close()


async def test_token_at_the_websocket_upgrade(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET)
    async with deadline(10):
        # ?token= (browsers cannot set headers); no hello needed
        ws = await WsClient.connect(node.ws_port, f"/ws?x=1&token={token('dave')}")
        assert await ws.sub("chat") == 0
        reply = await ws.request({"op": "presence", "ch": "chat"}, "presence")
        assert reply["users"] == ["dave"]
        # a hello is still allowed and says who the connection is
        reply = await ws.request({"op": "hello"}, "welcome")
        assert reply["user"] == "dave"
        # binary connections: the SUBSCRIBED of fastim.binary after ?token=
        wb = await WsClient.connect(
            node.ws_port, f"/ws?token={token('erin')}", protocols="fastim.binary"
        )
        wb.send_binary(_core.encode_frame(F.SUB, b"\x00\x00\x00\x07\x04chat"))
        t, _p = await wb.recv_frame()
        assert t == F.SUBSCRIBED
        # a bad token at the upgrade: the upgrade succeeds, then AUTH_FAILED and 4501,
        # which a browser can read (a refused upgrade would look like a network error)
        bad = await WsClient.connect(node.ws_port, "/ws?token=not.a.jwt")
        await refused_ws(bad, "not a JWT")
        empty = await WsClient.connect(node.ws_port, "/ws?token=")
        await refused_ws(empty, "non-empty string")
    await ws.close()
    await wb.close()


async def test_sdk_connects_with_the_token_in_the_url(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET)
    url = f"ws://127.0.0.1:{node.ws_port}/ws?token={token('frank')}"
    async with deadline(10), await connect(url, reconnect=False) as client:
        sub = await client.subscribe("news")
        off = await client.publish("news", {"x": 1})
        msg = await sub.get()
        assert (msg.offset, msg.data) == (off, {"x": 1})
        presence = await client.presence("news")
        assert presence["users"] == ["frank"]


async def test_expired_and_not_yet_valid_tokens(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET, jwt_leeway=30.0)
    now = time.time()
    async with deadline(10):
        c = await tcp_hello(node.tcp_port, token=token(ttl=-1))
        await refused_tcp(c, "expired")
        c = await tcp_hello(node.tcp_port, token=token(nbf=int(now + 120)))
        await refused_tcp(c, '"nbf" is')
        c = await tcp_hello(node.tcp_port, token=token(iat=int(now + 120)))
        await refused_tcp(c, '"iat" is')
        # within the leeway: a token minted by a clock a little ahead of the node's
        c, info = await tcp_login(node.tcp_port, token=token(nbf=int(now + 10), iat=int(now + 10)))
        assert info["user"] == "alice"
        await c.close()
        assert node.auth.failed == 3


async def test_a_connection_ends_when_its_token_expires(node_factory: Any) -> None:
    """``exp`` holds for the connection's whole life, not only at connect: when it
    passes, the node answers AUTH_FAILED and closes with 4501, on TCP and WebSocket."""
    node = await node_factory(jwt_secret=SECRET)
    async with deadline(10):
        c, _info = await tcp_login(node.tcp_port, token=token(exp=time.time() + 1.0))
        assert await c.sub("news") == 0
        ws = await WsClient.connect(node.ws_port, f"/ws?token={token(exp=time.time() + 1.0)}")
        assert await ws.sub("news") == 0
        lasting, _ = await tcp_login(node.tcp_port, token=token("bob", ttl=60))
        t0 = time.monotonic()
        await refused_tcp(c, "token expired")
        await refused_ws(ws, "token expired")
        assert time.monotonic() - t0 < 3  # at exp (the wheel's resolution), not at a ping
        assert node.auth.expired == 2
        assert await lasting.pub("news", b"1") == 1  # other connections are untouched
    await lasting.close()


async def test_refresh_extends_a_connection_past_its_first_token(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET)
    async with deadline(10):
        ws = await WsClient.connect(node.ws_port, f"/ws?token={token(exp=time.time() + 1.0)}")
        assert await ws.sub("news") == 0
        reply = await ws.request({"op": "refresh", "token": token(ttl=60)}, "refreshed")
        assert reply["exp"] > time.time() + 50
        # over TCP the command rides in a CMD frame
        c, _info = await tcp_login(node.tcp_port, token=token(exp=time.time() + 1.0))
        c.send(F.CMD, orjson.dumps({"op": "refresh", "token": token(ttl=60), "id": 5}))
        ev = orjson.loads(await c.expect(F.EVENT))
        assert ev["op"] == "refreshed" and ev["id"] == 5
        await ws.pump(1.8)  # past the first tokens' exp
        assert await ws.pub("news", 1) == 1
        assert await c.pub("news", b"2") == 2
        assert node.auth.expired == 0
        # the new token must name the same user; a bad one is fatal like at connect
        ws.send_json({"op": "refresh", "token": token("mallory"), "id": 9})
        await refused_ws(ws, "not this connection's user")
    await c.close()


async def test_refresh_needs_a_token_connection(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET, anonymous="on")
    async with deadline(10):
        ws = await WsClient.connect(node.ws_port)
        ws.send_json({"op": "refresh", "token": token(), "id": 1})
        _code, _reason, before = await ws.recv_close()
        err = orjson.loads(before[-1][1])
        assert err["code"] == ErrorCode.BAD_REQUEST and "did not authenticate" in err["reason"]


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: token(key="another-secret-another-secret-0123456789"), "signature"),
        (lambda: token(sub=None), 'lacks the "sub" claim'),
        (lambda: jwt.encode({"sub": "a"}, SECRET, algorithm="HS256"), 'lacks the "exp" claim'),
        (lambda: jwt.encode({"sub": "a", "exp": 9e9}, "", algorithm="none"), "algorithm"),
        (lambda: token(sub=""), '"sub" must be a user id'),
        (lambda: token(sub="a\nb"), '"sub" must be a user id'),
        (lambda: token(sub=7), '"sub" must be a user id'),
        (lambda: token(exp="soon"), '"exp" must be a number'),
        (lambda: token(channels="room:*"), '"channels" must be a list'),
        (lambda: token(channels={"read": ["x"]}), "unknown keys"),
        (lambda: token(channels=[1]), "not 1..255 bytes"),
        (lambda: token(aud="elsewhere"), "audience"),
        (lambda: "x" * 9000, "at most 8192"),
        (lambda: 12, "must be a non-empty string"),
    ],
)
async def test_bad_tokens_are_refused_and_named(node_factory: Any, make: Any, needle: str) -> None:
    node = await node_factory(jwt_secret=SECRET)
    async with deadline(10):
        c = await tcp_hello(node.tcp_port, token=make())
        await refused_tcp(c, needle)
        ws = await WsClient.connect(node.ws_port)
        ws.send_json({"op": "hello", "token": make()})
        await refused_ws(ws, needle)


async def test_audience_and_issuer(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET, jwt_audience="chat", jwt_issuer="app")
    async with deadline(10):
        c, info = await tcp_login(node.tcp_port, token=token(aud="chat", iss="app"))
        assert info["user"] == "alice"
        await c.close()
        c = await tcp_hello(node.tcp_port, token=token(aud=["chat", "mail"], iss="app"))
        await c.expect(F.WELCOME)
        await c.close()
        for bad, needle in (
            (token(aud="mail", iss="app"), "audience"),
            (token(iss="app"), 'lacks the "aud" claim'),
            (token(aud="chat", iss="evil"), "issuer"),
        ):
            c = await tcp_hello(node.tcp_port, token=bad)
            await refused_tcp(c, needle)


async def test_no_token_when_anonymous_is_off(node_factory: Any) -> None:
    # anonymous = auto: off, because a secret is set
    node = await node_factory(jwt_secret=SECRET, handshake_timeout=0.5)
    assert node.auth.required
    async with deadline(10):
        c = await tcp_hello(node.tcp_port)
        await refused_tcp(c, "needs a token")
        c = await tcp_hello(node.tcp_port, user="alice")  # declaring is not proving
        await refused_tcp(c, "needs a token")
        ws = await WsClient.connect(node.ws_port)
        ws.send_json({"op": "sub", "ch": "news", "id": 1})
        await refused_ws(ws, "authenticate first")
        ws = await WsClient.connect(node.ws_port)
        ws.send_json({"op": "ping"})
        await refused_ws(ws, "authenticate first")
        ws = await WsClient.connect(node.ws_port, protocols="fastim.binary")
        ws.send_binary(_core.encode_frame(F.SUB, b"\x00\x00\x00\x01\x04news"))
        code, _reason, before = await ws.recv_close()
        assert code == CloseCode.AUTH_FAILED
        frames = _core.FrameDecoder(1 << 20).feed(before[0][1])
        assert frames[0][0] == F.ERROR
        assert unpack_error(frames[0][1])[1] == ErrorCode.AUTH_FAILED
        # silence: closed after handshake_timeout
        t0 = time.monotonic()
        ws = await WsClient.connect(node.ws_port)
        await refused_ws(ws, "no token within 0.5s")
        assert 0.3 < time.monotonic() - t0 < 3
        # with a token a little later than the upgrade: fine, and the connection stays
        # past the handshake deadline
        ws = await WsClient.connect(node.ws_port)
        reply = await ws.request({"op": "hello", "token": token("gina")}, "welcome")
        assert reply["user"] == "gina"
        await ws.pump(0.8)
        assert await ws.sub("news") == 0
    await ws.close()


async def test_anonymous_on_with_a_secret(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET, anonymous="on")
    async with deadline(10):
        c = await TcpClient.connect(node.tcp_port)  # HELLO without options
        assert await c.sub("news") == 0
        ws = await WsClient.connect(node.ws_port)
        assert await ws.pub("news", {"anon": True}) == 1
        # but a user can only come from a token where tokens can be verified
        c2 = await tcp_hello(node.tcp_port, user="alice")
        await refused_tcp(c2, "users come from tokens")
        ws2 = await WsClient.connect(node.ws_port)
        ws2.send_json({"op": "hello", "user": "alice"})
        await refused_ws(ws2, "users come from tokens")
        direct = await ws.request({"op": "send", "to": "bob", "data": 1}, "error")
        assert direct["code"] == ErrorCode.NO_USER
    await c.close()
    await ws.close()


async def test_token_user_wins_over_a_declared_one(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET)
    async with deadline(10):
        c = await tcp_hello(node.tcp_port, user="bob", token=token("alice"))
        await refused_tcp(c, 'not the token\'s "sub"')
        c, info = await tcp_login(node.tcp_port, user="alice", token=token("alice"))
        assert info["user"] == "alice"
        await c.close()
        ws = await WsClient.connect(node.ws_port, f"/ws?token={token('alice')}")
        reply = await ws.request({"op": "hello", "user": "alice"}, "welcome")
        assert reply["user"] == "alice"
        ws.send_json({"op": "hello", "user": "bob"})
        await refused_ws(ws, 'not the token\'s "sub"')
        # one token per connection: a second one is a protocol error
        ws = await WsClient.connect(node.ws_port, f"/ws?token={token('alice')}")
        ws.send_json({"op": "hello", "token": token("bob")})
        code, _reason, before = await ws.recv_close()
        assert code == CloseCode.BAD_REQUEST
        assert b"already authenticated" in before[0][1]


async def test_direct_messages_go_to_the_token_user(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET)
    async with deadline(10):
        alice = await WsClient.connect(node.ws_port, f"/ws?token={token('alice')}")
        bob = await WsClient.connect(node.ws_port, f"/ws?token={token('bob')}")
        sent = await alice.request({"op": "send", "to": "bob", "data": {"t": 1}}, "sent")
        assert sent["seq"] == 1
        dm = await bob.recv_json()
        assert (dm["op"], dm["from"], dm["data"]) == ("dm", "alice", {"t": 1})
    await alice.close()
    await bob.close()


async def test_embedded_default_is_unchanged(node_factory: Any) -> None:
    node = await node_factory()
    assert not node.auth.enabled and not node.auth.required and not node.auth.rules
    async with deadline(10):
        c, info = await tcp_login(node.tcp_port, user="zoe")
        assert info["user"] == "zoe"
        assert await c.sub("room:1") == 0
        c2 = await tcp_hello(node.tcp_port, token=token())
        await refused_tcp(c2, "verifies no tokens")
    await c.close()


# --------------------------------------------------------------------------- permissions


async def test_flat_channels_claim_limits_subscribe_and_publish(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET)
    async with deadline(10):
        ws = await WsClient.connect(
            node.ws_port, f"/ws?token={token(channels=['room:*', 'lobby'])}"
        )
        assert await ws.sub("room:1") == 0
        assert await ws.sub("lobby") == 0
        assert await ws.pub("room:1", "hi") == 1
        await denied(ws, {"op": "sub", "ch": "news"}, "does not allow subscribe on 'news'")
        await denied(ws, {"op": "pub", "ch": "lobby2", "data": 1}, "does not allow publish")
        await denied(ws, {"op": "presence", "ch": "news"}, "presence")
        # refusals are not fatal: the connection keeps working
        assert (await ws.msg())["data"] == "hi"
        assert await ws.pub("room:1", "again") == 2
        assert node.auth.denied == 3
    await ws.close()


async def test_sub_and_pub_channels_claim(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET)
    claims = {"sub": ["feed:*"], "pub": ["chat:*"]}
    async with deadline(10):
        c, _ = await tcp_login(node.tcp_port, token=token(channels=claims))
        assert await c.sub("feed:1") == 0
        assert await c.pub("chat:1", b"1") == 1
        rid = c.send_pub("feed:1", b"2")
        t, p = await c.recv()
        assert t == F.ERROR
        got_id, code, reason = unpack_error(p)
        assert (got_id, code) == (rid, ErrorCode.PERMISSION_DENIED)
        assert "publish on 'feed:1'" in reason
        rid = c.send_sub("chat:1")
        t, p = await c.recv()
        assert t == F.ERROR and unpack_error(p)[:2] == (rid, ErrorCode.PERMISSION_DENIED)
        # object form: a key left out allows nothing for that action
        c2, _ = await tcp_login(node.tcp_port, token=token(channels={"sub": ["*"]}))
        assert await c2.sub("anything") == 0
        c2.send_pub("anything", b"1")
        t, p = await c2.recv()
        assert t == F.ERROR and unpack_error(p)[1] == ErrorCode.PERMISSION_DENIED
    await c.close()
    await c2.close()


NAMESPACES = {
    "members": {"allow_subscribe": "user", "allow_publish": "user"},
    "announce": {"allow_publish": "none"},
    "scoped": {"allow_subscribe": "token", "allow_publish": "token"},
    "live": {"allow_history": "none"},
    "private": {"allow_presence": "user"},
}


async def test_namespace_rules(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET, anonymous="on", namespaces=NAMESPACES)
    assert node.auth.rules
    async with deadline(15):
        anon = await WsClient.connect(node.ws_port)
        await denied(anon, {"op": "sub", "ch": "members:1"}, "needs a token")
        await denied(anon, {"op": "pub", "ch": "members:1", "data": 1}, "allow_publish = user")
        await denied(anon, {"op": "pub", "ch": "announce:x", "data": 1}, "allow_publish = none")
        await denied(anon, {"op": "sub", "ch": "scoped:1"}, "needs a token")
        await denied(anon, {"op": "presence", "ch": "private:1"}, "allow_presence = user")
        assert await anon.sub("live:1") == 0  # subscribing is fine...
        since = {"off": 0, "epoch": "x"}
        await denied(anon, {"op": "sub", "ch": "live:2", "since": since}, "allow_history = none")
        assert await anon.sub("news") == 0  # the default namespace: any
        # binary frames are checked the same way
        tcp = await TcpClient.connect(node.tcp_port)
        rid = tcp.send_sub("members:1")
        t, p = await tcp.recv()
        assert t == F.ERROR and unpack_error(p)[:2] == (rid, ErrorCode.PERMISSION_DENIED)
        assert await tcp.sub("news") == 0

        user = await WsClient.connect(node.ws_port, f"/ws?token={token('ursula')}")
        assert await user.sub("members:1") == 0
        assert await user.pub("members:1", 1) == 1
        await user.request({"op": "presence", "ch": "private:1"}, "presence")
        await denied(user, {"op": "sub", "ch": "scoped:1"}, "channels claim lists it")
        await denied(user, {"op": "pub", "ch": "announce:x", "data": 1}, "allow_publish = none")

        scoped = await WsClient.connect(
            node.ws_port, f"/ws?token={token('sam', channels=['scoped:1', 'members:*'])}"
        )
        assert await scoped.sub("scoped:1") == 0
        assert await scoped.pub("scoped:1", 1) == 1
        await denied(scoped, {"op": "sub", "ch": "scoped:2"}, "does not allow subscribe")
        # the claim limits its holder everywhere, even where the rule is "any"
        await denied(scoped, {"op": "sub", "ch": "news"}, "does not allow subscribe")
    for c in (anon, user, scoped):
        await c.close()
    await tcp.close()


async def test_join_leave_events_follow_allow_presence(node_factory: Any) -> None:
    """A join or leave names a user: only subscribers allowed to see the channel's
    presence get it (here allow_presence = user: connections with a token)."""
    node = await node_factory(
        jwt_secret=SECRET,
        anonymous="on",
        namespaces={"club": {"allow_presence": "user", "join_leave": True, "presence": True}},
    )
    async with deadline(15):
        anon = await WsClient.connect(node.ws_port)
        assert await anon.sub("club:1") == 0
        member = await WsClient.connect(node.ws_port, f"/ws?token={token('mia')}")
        assert await member.sub("club:1") == 0
        tcp, _ = await tcp_login(node.tcp_port, token=token("tom"))
        assert await tcp.sub("club:1") == 0
        ev = await member.recv_json()
        assert (ev["op"], ev["user"]) == ("join", "tom")
        await tcp.close()
        ev = await member.recv_json()
        assert (ev["op"], ev["user"]) == ("leave", "tom")
        # the anonymous subscriber, there first, saw neither mia's nor tom's join nor
        # tom's leave: the first thing it gets is the publish
        assert await member.pub("club:1", 1) == 1
        got = await anon.recv_json()
        assert got["op"] == "msg" and got["data"] == 1, got
    await anon.close()
    await member.close()


async def test_top_level_rules_apply_to_every_namespace(node_factory: Any) -> None:
    node = await node_factory(
        jwt_secret=SECRET,
        anonymous="on",
        allow_publish="user",
        namespaces={"open": {"allow_publish": "any"}, "room": {"history_size": 10}},
    )
    async with deadline(10):
        anon = await WsClient.connect(node.ws_port)
        await denied(anon, {"op": "pub", "ch": "news", "data": 1}, "the default namespace")
        await denied(anon, {"op": "pub", "ch": "room:1", "data": 1}, "namespace 'room'")
        assert await anon.pub("open:1", 1) == 1
    await anon.close()


async def test_a_token_is_never_logged(node_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    node = await node_factory(jwt_secret=SECRET)
    good = token("alice")
    bad = token("alice", ttl=-5)
    async with deadline(10):
        ws = await WsClient.connect(node.ws_port, f"/ws?token={good}")
        assert await ws.sub("x") == 0
        c = await tcp_hello(node.tcp_port, token=bad)
        await refused_tcp(c, "expired")
        c = await tcp_hello(node.tcp_port, token=good[:-3] + "AAA")
        await refused_tcp(c, "signature")
    await ws.close()
    text = caplog.text
    for secret in (good, bad, good.split(".")[2], SECRET):
        assert secret not in text


# --------------------------------------------------------------------------- unit


def _auth(**settings: Any) -> Auth:
    return Auth(Config(**settings).validate())


def test_verify_returns_the_identity() -> None:
    auth = _auth(jwt_secret=SECRET)
    ident = auth.verify(token("alice", channels={"sub": ["a:*"], "pub": []}))
    assert ident.user == "alice"
    assert ident.sub is not None and "a:1" in ident.sub and "b:1" not in ident.sub
    assert ident.pub is not None and "a:1" not in ident.pub
    assert ident.expires > time.time()
    plain = auth.verify(token("bob"))
    assert plain.sub is None and plain.pub is None
    # RFC 7518 §3.2: an HMAC key at least as long as the hash: this 38-byte one is HS256 only
    assert auth.algorithms == ["HS256"]
    long = "k" * 64
    auth = _auth(jwt_secret=long)
    assert auth.algorithms == ["HS256", "HS384", "HS512"]
    assert auth.verify(token("c", key=long, alg="HS512")).user == "c"


def test_patterns_are_fnmatch_globs() -> None:
    auth = _auth(jwt_secret=SECRET)
    ident = auth.verify(token(channels=["room:*", "user:?", "[ab]x", "exact"]))
    assert ident.sub is not None
    inside = ["room:", "room:1:2", "user:7", "ax", "bx", "exact"]
    outside = ["room", "Room:1", "user:77", "cx", "exact2", "xexact"]
    assert all(ch in ident.sub for ch in inside)
    assert not any(ch in ident.sub for ch in outside)
    empty = auth.verify(token(channels=[]))
    assert empty.sub is not None and "anything" not in empty.sub


def test_refusal_rules() -> None:
    auth = _auth(jwt_secret=SECRET, anonymous="on", namespaces=NAMESPACES)
    hub_ns = Config(jwt_secret=SECRET, namespaces=NAMESPACES).validate().namespace_table()
    members = hub_ns.of("members:1")
    user = auth.verify(token("u"))
    scoped = auth.verify(token("s", channels=["members:1"]))
    assert auth.refusal(members, "subscribe", "members:1", None) is not None
    assert auth.refusal(members, "subscribe", "members:1", user) is None
    assert auth.refusal(members, "subscribe", "members:1", scoped) is None
    assert auth.refusal(members, "subscribe", "members:2", scoped) is not None
    assert auth.refusal(hub_ns.of("news"), "publish", "news", None) is None


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"jwt_secret": "short"}, "jwt_secret: at least 32 bytes"),
        ({"anonymous": "off"}, "anonymous: 'off' needs jwt_secret"),
        ({"anonymous": "maybe"}, "anonymous: must be auto, on or off"),
        ({"allow_publish": "user"}, "allow_publish: 'user' needs jwt_secret"),
        ({"allow_publish": "admins"}, "allow_publish: must be one of any, user, token, none"),
        (
            {"namespaces": {"room": {"allow_subscribe": "token"}}},
            "namespaces.room.allow_subscribe: 'token' needs",
        ),
        (
            {"jwt_secret": SECRET, "namespaces": {"room": {"allow_subscribe": "members"}}},
            "namespaces.room.allow_subscribe: must be one of",
        ),
        ({"jwt_public_key": "/nonexistent.pem"}, "jwt_public_key: cannot read"),
        ({"jwt_secret": SECRET, "jwt_leeway": -1.0}, "jwt_leeway: must be >= 0"),
    ],
)
def test_bad_settings_are_named(settings: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        Config(**settings).validate()
    assert needle in str(e.value)
    assert SECRET not in str(e.value)


def test_public_key_files(tmp_path: Path, keys: Any) -> None:
    not_pem = tmp_path / "x.pem"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        Config(jwt_public_key=str(not_pem)).validate()
    small = tmp_path / "small.pem"
    small.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=1024)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigError, match="RSA key of 1024 bits"):
        Config(jwt_public_key=str(small)).validate()
    assert _auth(jwt_public_key=keys["ES256"][1]).algorithms == ["ES256"]
    both = _auth(jwt_public_key=keys["RS256"][1], jwt_secret=SECRET)
    assert "RS256" in both.algorithms and "HS256" in both.algorithms
    assert both.verify(token("r", keys["RS256"][0], "RS256")).user == "r"
    assert both.verify(token("h")).user == "h"


def test_the_secret_is_masked_in_printed_settings() -> None:
    assert redact("jwt_secret", SECRET) == "***"
    assert redact("jwt_secret", "") == ""


def test_auth_failed_closes_with_4501() -> None:
    e = AuthFailed("x")
    assert e.code == ErrorCode.AUTH_FAILED and e.close_code == CloseCode.AUTH_FAILED
    assert ErrorCode.AUTH_FAILED.fatal and not ErrorCode.PERMISSION_DENIED.fatal
    assert not CloseCode.should_reconnect(CloseCode.AUTH_FAILED)


async def test_refreshed_exp_is_an_integer(node_factory: Any) -> None:
    """docs/security.md shows ``{"op":"refreshed","exp":<the new exp>}`` with the token's
    exp as an integer (Unix seconds), whatever the token held (a NumericDate may have a
    fraction): never 1767225600.0."""
    node = await node_factory(jwt_secret=SECRET)
    async with deadline(10):
        ws = await WsClient.connect(node.ws_port, f"/ws?token={token(ttl=60)}")
        exp = int(time.time()) + 120
        for claim in (exp, exp + 0.75):
            fresh = jwt.encode({"sub": "alice", "exp": claim}, SECRET, algorithm="HS256")
            reply = await ws.request({"op": "refresh", "token": fresh}, "refreshed")
            assert isinstance(reply["exp"], int) and reply["exp"] == exp, reply
        c, _info = await tcp_login(node.tcp_port, token=token(ttl=60))
        c.send(F.CMD, orjson.dumps({"op": "refresh", "token": token(ttl=60), "id": 5}))
        raw = await c.expect(F.EVENT)
        assert b'"exp":' in raw and isinstance(orjson.loads(raw)["exp"], int), raw
        await c.close()
        await ws.close()


def test_security_doc_does_not_list_refresh_as_missing() -> None:
    """Token refresh on an open connection exists (the tests above): docs/security.md
    describes it and must not also list it under "Not there (yet)"."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    assert '{"op":"refresh","token":' in doc
    missing = doc.split("## Not there (yet)", 1)[1].split("\n## ", 1)[0]
    assert "refresh" not in missing.lower(), missing
