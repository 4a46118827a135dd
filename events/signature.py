"""SendGrid's signed Event Webhook: ECDSA P-256 with SHA-256 over the timestamp header's value
followed by the raw body; the signature (base64 DER) and the timestamp come in two headers, the
public key is the base64 DER SubjectPublicKeyInfo the console shows."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from mailer.errors import ConfigError

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"


class Refused(Exception):
    """A request that is not SendGrid's (403); the text says why, never echoing a secret."""


def load_key(text: str) -> ec.EllipticCurvePublicKey:
    """The console's key: base64 of a DER SubjectPublicKeyInfo (a PEM's body is accepted too)."""
    body = "".join(
        line for line in text.strip().splitlines() if not line.startswith("-----")
    ).strip()
    if not body:
        raise ConfigError(
            "MAILER_SENDGRID_WEBHOOK_KEY", "not set: the Event Webhook's verification key"
        )
    try:
        key = load_der_public_key(base64.b64decode(body, validate=True))
    except (ValueError, binascii.Error):
        raise ConfigError(
            "MAILER_SENDGRID_WEBHOOK_KEY",
            "not a base64 DER public key (copy it from the Event Webhook's settings)",
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ConfigError("MAILER_SENDGRID_WEBHOOK_KEY", "expected an ECDSA P-256 public key")
    return key


def header(headers: Mapping[str, str], name: str) -> str:
    """A header by name, any case (frameworks differ)."""
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return ""


class Verifier:
    def __init__(self, public_key: str, tolerance: float = 300.0) -> None:
        self.key = load_key(public_key)
        self.tolerance = tolerance

    def verify(self, headers: Mapping[str, str], body: bytes, now: float | None = None) -> None:
        """Returns when the request is SendGrid's and fresh; raises Refused otherwise."""
        signature = header(headers, SIGNATURE_HEADER).strip()
        stamp = header(headers, TIMESTAMP_HEADER).strip()
        if not signature or not stamp:
            raise Refused("missing signature or timestamp header")
        try:
            sent_at = int(stamp)
        except ValueError:
            raise Refused("timestamp header is not Unix seconds") from None
        if abs((time.time() if now is None else now) - sent_at) > self.tolerance:
            raise Refused("stale timestamp")
        try:
            der = base64.b64decode(signature, validate=True)
            self.key.verify(der, stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError, binascii.Error):
            raise Refused("bad signature") from None
