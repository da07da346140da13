"""Who may connect and what they may do: JWT connect tokens, channel rules, TLS contexts.

A client proves who it is with a connect token, a JWT signed by the operator's
application (never by the node): HS256 with a shared secret (``jwt_secret``; HS384 and
HS512 too when it is 48 / 64 bytes or longer),
or RS*/PS*/ES*/EdDSA with a key pair whose public half the node reads from a PEM file
(``jwt_public_key``). The node only verifies: it needs no database of users, and the
token it accepted says everything it will know about that connection.

Claims the node reads (docs/security.md):

* ``sub`` (required): the user id of the connection.
* ``exp`` (required): expiry, enforced without leeway; a token without one would live
  for ever, so it is refused. ``nbf`` and ``iat`` are checked with ``jwt_leeway``
  seconds of slack, because a token minted a moment ago by an application whose clock
  runs ahead of the node's would otherwise be "not yet valid".
* ``aud`` / ``iss``: checked when ``jwt_audience`` / ``jwt_issuer`` are set; a token
  that names an audience is refused by a node that has none configured (it was meant
  for some other service).
* ``channels`` (optional): the channel patterns the holder may use, either a flat list
  (subscribe and publish) or ``{"sub": [...], "pub": [...]}``. A token that carries it
  is limited to those patterns on every channel; patterns are ``fnmatch`` globs
  (``room:*``).

What a connection may do on a channel is then decided per namespace by four rules
(values in :data:`RULES`): ``allow_subscribe``, ``allow_publish``, ``allow_history``
(subscribe with ``since``) and ``allow_presence``. :meth:`Auth.refusal` applies them.

The algorithms a token may use are chosen by the *key*, never by the token: the secret
only verifies HS*, an RSA key only RS*/PS*, an EC key only the ES* of its curve. A token
whose header names another algorithm is refused before any verification, which closes
the classic "alg: none" and "HS256 signed with the public key" confusions.

Tokens and secrets are never logged, nor put into error reasons.
"""

from __future__ import annotations

import fnmatch
import functools
import re
import time
from dataclasses import dataclass
from typing import Any

import jwt

from .config import Config
from .config.namespaces import RULE_KEYS, RULE_VALUES, Namespace
from .config.security import (
    ANONYMOUS_VALUES as ANONYMOUS_VALUES,
)
from .config.security import (
    MIN_SECRET_BYTES as MIN_SECRET_BYTES,
)
from .config.security import (
    load_public_key as load_public_key,
)
from .config.security import (
    tls_server_context as tls_server_context,
)
from .errors import ProtocolError
from .protocol import CloseCode, ErrorCode, validate_channel

#: values of the per-namespace rules (allow_subscribe, allow_publish, allow_history,
#: allow_presence): everyone (anonymous connections too); connections with a verified
#: token; only channels the token's ``channels`` claim lists; nobody
RULES = RULE_VALUES

#: a token longer than this is refused unread (a JWT of a few claims is ~300 bytes)
MAX_TOKEN = 8192
#: a ``channels`` claim lists at most this many patterns per action
MAX_PATTERNS = 256

#: HMAC algorithms and the key length each needs (RFC 7518 §3.2: at least the hash's size)
_HMAC_ALGS = {"HS256": 32, "HS384": 48, "HS512": 64}

#: the claim list each action is checked against: history and presence are reads
_CLAIM_OF = {"subscribe": "sub", "history": "sub", "presence": "sub", "publish": "pub"}


class AuthFailed(ProtocolError):
    """A token is missing, malformed, expired or does not verify: fatal to the connection.

    Closed with 4501 (4500-4999: reconnecting with the same input fails again; the
    client needs a new token), not a reconnect code.
    """

    code = ErrorCode.AUTH_FAILED

    @property
    def close_code(self) -> int:
        return CloseCode.AUTH_FAILED


# --------------------------------------------------------------------------- identities


class Patterns:
    """Channel patterns of a token claim, compiled into one regular expression."""

    __slots__ = ("_match", "patterns")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns = patterns
        self._match = _compile(patterns)

    def __contains__(self, channel: str) -> bool:
        return self._match is not None and self._match(channel) is not None

    def __repr__(self) -> str:
        return f"Patterns({list(self.patterns)!r})"


@functools.lru_cache(maxsize=1024)
def _compile(patterns: tuple[str, ...]) -> Any:
    """One regex for a claim list. Cached: the connections of one application carry the
    same few claim lists, and compiling per connection would cost more than verifying."""
    if not patterns:
        return None
    return re.compile("|".join(fnmatch.translate(p) for p in patterns)).match


@dataclass(frozen=True, slots=True)
class Identity:
    """What a verified token says about its connection."""

    user: str
    #: channels the holder may subscribe to (and read history and presence of);
    #: None: the token does not limit them
    sub: Patterns | None
    #: channels the holder may publish to; None: not limited by the token
    pub: Patterns | None
    #: the token's ``exp`` (Unix time)
    expires: float
    #: channels the node subscribes the connection to by itself (the ``subs`` claim;
    #: a connect hook's ``channels``): server-side subscriptions
    server_subs: tuple[str, ...] = ()


def _pattern_list(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise AuthFailed(f"token claim {where} must be a list of channel patterns")
    if len(value) > MAX_PATTERNS:
        raise AuthFailed(f"token claim {where} lists over {MAX_PATTERNS} patterns")
    out = []
    for p in value:
        if not isinstance(p, str) or not 0 < len(p.encode("utf-8", "surrogatepass")) <= 255:
            raise AuthFailed(f"token claim {where} holds a pattern that is not 1..255 bytes")
        out.append(p)
    return tuple(out)


def _channel_claims(claims: dict[str, Any]) -> tuple[Patterns | None, Patterns | None]:
    """The ``channels`` claim: a flat list (both actions) or ``{"sub": [...], "pub": [...]}``.

    In the object form a missing key means *no* channel for that action: a token that
    bothers to list what it may subscribe to should not gain publishing by omission.
    """
    if "channels" not in claims:
        return None, None
    raw = claims["channels"]
    if isinstance(raw, list):
        both = Patterns(_pattern_list(raw, '"channels"'))
        return both, both
    if isinstance(raw, dict):
        unknown = set(raw) - {"sub", "pub"}
        if unknown:
            raise AuthFailed(f'token claim "channels" has unknown keys {sorted(unknown)}')
        sub = Patterns(_pattern_list(raw.get("sub", []), '"channels.sub"'))
        pub = Patterns(_pattern_list(raw.get("pub", []), '"channels.pub"'))
        return sub, pub
    raise AuthFailed('token claim "channels" must be a list or {"sub": [...], "pub": [...]}')


def _subs_claim(claims: dict[str, Any]) -> tuple[str, ...]:
    """The ``subs`` claim: channels the node subscribes the connection to at connect.

    A list of channel names, or Centrifugo's map of channel → options (the names are
    taken). Not ``channels``: in fastim that claim lists the patterns a connection *may*
    use (see :func:`_channel_claims`); ``subs`` lists what it *is* subscribed to.
    """
    raw = claims.get("subs")
    if raw is None:
        return ()
    if isinstance(raw, dict):
        raw = list(raw)
    if not isinstance(raw, list) or len(raw) > MAX_PATTERNS:
        raise AuthFailed(f'token claim "subs" must be a list of at most {MAX_PATTERNS} channels')
    out = []
    for ch in raw:
        try:
            out.append(validate_channel(ch))
        except ProtocolError:
            raise AuthFailed('token claim "subs" holds a name that is not a channel') from None
    return tuple(dict.fromkeys(out))


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuthFailed(f'token claim "{name}" must be a number (Unix time)')
    return float(value)


# --------------------------------------------------------------------------- keys


# --------------------------------------------------------------------------- the node's


class Auth:
    """The node's verifier of connect tokens and judge of channel rules (``node.auth``)."""

    def __init__(self, cfg: Config) -> None:
        #: tokens can be verified: users come only from tokens then
        self.enabled = bool(cfg.jwt_secret or cfg.jwt_public_key)
        anonymous = cfg.anonymous
        if anonymous == "auto":
            anonymous = "off" if self.enabled else "on"
        #: a connection must present a valid token before anything else
        self.required = anonymous == "off"
        #: algorithm → key; the key decides which algorithms are acceptable
        self._keys: dict[str, Any] = {}
        if cfg.jwt_secret:
            secret = cfg.jwt_secret.encode()
            for alg, need in _HMAC_ALGS.items():
                if len(secret) >= need:
                    self._keys[alg] = secret
        if cfg.jwt_public_key:
            key, algs = load_public_key(cfg.jwt_public_key)
            for alg in algs:
                self._keys[alg] = key
        self._audience = cfg.jwt_audience or None
        self._issuer = cfg.jwt_issuer or None
        self._leeway = cfg.jwt_leeway
        #: some namespace restricts something: every connection's requests are checked
        #: (else only those of connections whose token carries a channels claim)
        self.rules = any(
            getattr(ns, key) != "any" for ns in cfg.namespace_table() for key in RULE_KEYS
        )
        # counters for metrics
        self.verified = 0
        self.failed = 0
        self.denied = 0
        #: connections closed because their token expired (fastim.session.TokenExpiry)
        self.expired = 0

    @property
    def algorithms(self) -> list[str]:
        return sorted(self._keys)

    def verify(self, token: object) -> Identity:
        """Check a connect token; return its :class:`Identity` or raise :class:`AuthFailed`."""
        try:
            identity = self._verify(token)
        except AuthFailed:
            self.failed += 1
            raise
        self.verified += 1
        return identity

    def _verify(self, token: object) -> Identity:
        if not isinstance(token, str) or not token:
            raise AuthFailed('field "token" must be a non-empty string')
        if len(token) > MAX_TOKEN:
            raise AuthFailed(f"token of {len(token)} bytes, at most {MAX_TOKEN}")
        if not self.enabled:
            raise AuthFailed("this node verifies no tokens (no jwt_secret or jwt_public_key)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthFailed("token is not a JWT (header.payload.signature)") from None
        alg = header.get("alg")
        key = self._keys.get(alg) if isinstance(alg, str) else None
        if key is None or not isinstance(alg, str):
            raise AuthFailed(
                f"token algorithm {alg!r} not accepted here (accepted: "
                f"{', '.join(self.algorithms)})"
            )
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                # the time claims are checked below, the same way on every PyJWT version
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_sub": False,
                    "require": ["exp", "sub"],
                },
            )
        except jwt.InvalidSignatureError:
            raise AuthFailed("token signature does not verify") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthFailed(f'token lacks the "{e.claim}" claim') from None
        except jwt.InvalidAudienceError:
            raise AuthFailed("token audience (aud) is not this node's jwt_audience") from None
        except jwt.InvalidIssuerError:
            raise AuthFailed("token issuer (iss) is not this node's jwt_issuer") from None
        except jwt.PyJWTError as e:
            raise AuthFailed(f"invalid token: {e}") from None
        now = time.time()
        exp = _number(claims, "exp")
        assert exp is not None  # required above
        if exp <= now:
            raise AuthFailed(f"token expired {now - exp:.0f}s ago")
        for name in ("nbf", "iat"):
            t = _number(claims, name)
            if t is not None and t > now + self._leeway:
                raise AuthFailed(f'token not valid yet ("{name}" is {t - now:.0f}s ahead)')
        sub = claims.get("sub")
        try:
            user = validate_channel(sub)  # a user id follows the rules of a channel name
        except ProtocolError:
            raise AuthFailed(
                'token claim "sub" must be a user id: 1..255 bytes, no control characters'
            ) from None
        sub_patterns, pub_patterns = _channel_claims(claims)
        return Identity(user, sub_patterns, pub_patterns, exp, _subs_claim(claims))

    def refusal(
        self, ns: Namespace, action: str, channel: str, identity: Identity | None
    ) -> str | None:
        """Why ``identity`` (None: anonymous) may not ``action`` on ``channel``; None if it may.

        ``action`` is subscribe, publish, history or presence. The namespace rule is
        applied first; then a token's ``channels`` claim, which limits its holder
        whatever the rule.
        """
        rule = getattr(ns, "allow_" + action)
        where = f"namespace {ns.name!r}" if ns.name else "the default namespace"
        if rule == "none":
            return f"{action} is not allowed on {where} (allow_{action} = none)"
        if identity is None:
            if rule == "any":
                return None
            return f"{action} on {channel!r} needs a token (allow_{action} = {rule} on {where})"
        patterns: Patterns | None = getattr(identity, _CLAIM_OF[action])
        if patterns is None:
            if rule == "token":
                return (
                    f"{action} on {channel!r} needs a token whose channels claim lists it "
                    f"(allow_{action} = token on {where})"
                )
            return None
        if channel in patterns:
            return None
        return f"the token's channels claim does not allow {action} on {channel!r}"
