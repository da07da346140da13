"""Security settings that can be checked without a running node: JWT verification keys,
TLS certificate files, the anonymous and per-namespace rules.

Here, below :mod:`fastim.auth` and the listeners, so that :class:`~fastim.config.Config`
checks them at ``fastim config check`` and at start (a wrong path fails before the first
client, not at it), and :mod:`fastim.auth` and :mod:`fastim.node` use the same code.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

#: what ``anonymous`` may be set to; "auto": on unless a secret or a key is configured
ANONYMOUS_VALUES = ("auto", "on", "off")
#: RFC 7518 §3.2: an HMAC key at least as long as the hash output (HS256: 32 bytes)
MIN_SECRET_BYTES = 32
MIN_RSA_BITS = 2048

_RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


def load_public_key(path: str) -> tuple[Any, tuple[str, ...]]:
    """The key in a PEM file (a public key or a certificate) and the algorithms it verifies.

    Raises ValueError naming the problem (missing file, not PEM, a key type or size
    the node does not accept).
    """
    try:
        with open(path, "rb") as fh:
            pem = fh.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            key: Any = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = load_pem_public_key(pem)
    except ValueError as e:
        raise ValueError(f"{path}: not a PEM public key or certificate ({e})") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"{path}: RSA key of {key.key_size} bits, at least {MIN_RSA_BITS}")
        return key, _RSA_ALGS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGS.get(key.curve.name)
        if alg is None:
            raise ValueError(f"{path}: EC curve {key.curve.name} (accepted: {', '.join(_EC_ALGS)})")
        return key, (alg,)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return key, ("EdDSA",)
    raise ValueError(f"{path}: unsupported key type {type(key).__name__} (RSA, EC, Ed25519)")


def tls_server_context(tls_cert: str, tls_key: str, tls_client_ca: str) -> ssl.SSLContext | None:
    """The TLS context of both listeners, or None when ``tls_cert`` is not set.

    The arguments are the settings of the same names.

    TLS 1.2 or newer with the ``ssl`` module's default server ciphers. With
    ``tls_client_ca`` a client must present a certificate that CA signed (mutual TLS,
    meant for node-to-node links). Raises ValueError naming the file at fault.
    """
    if not tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # each file checked by name first: load_cert_chain's FileNotFoundError names neither
    for name, path in (("tls_cert", tls_cert), ("tls_key", tls_key)):
        if not os.path.isfile(path):
            raise ValueError(f"{name}: no such file: {path!r}")
    try:
        ctx.load_cert_chain(tls_cert, tls_key)
    except FileNotFoundError as e:
        raise ValueError(f"tls_cert/tls_key: no such file: {e.filename!r}") from None
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"tls_cert/tls_key: cannot load {tls_cert} with {tls_key}: {e}") from None
    if tls_client_ca:
        try:
            ctx.load_verify_locations(cafile=tls_client_ca)
        except FileNotFoundError:
            raise ValueError(f"tls_client_ca: no such file: {tls_client_ca!r}") from None
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"tls_client_ca: cannot load {tls_client_ca}: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
