"""SendGrid's signed Event Webhook: ECDSA P-256 with SHA-256 over the timestamp header's value
followed by the raw body; the signature (base64 DER) and the timestamp come in two headers, the
public key is the base64 DER SubjectPublicKeyInfo the console shows. Each SendGrid subuser
signs with a key of its own: `RelayVerifiers` picks the one of the relay a request is for."""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from mailer.errors import ConfigError
from mailer.wire import RELAY_NAME

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"


class Refused(Exception):
    """A request that is not SendGrid's (403); the text says why, never echoing a secret."""


def load_key(text: str, source: str = "MAILER_SENDGRID_WEBHOOK_KEY") -> ec.EllipticCurvePublicKey:
    """The console's key: base64 of a DER SubjectPublicKeyInfo (a PEM's body is accepted too);
    `source` names where it came from in an error."""
    body = "".join(
        line for line in text.strip().splitlines() if not line.startswith("-----")
    ).strip()
    if not body:
        raise ConfigError(source, "not set: the Event Webhook's verification key")
    try:
        key = load_der_public_key(base64.b64decode(body, validate=True))
    except (ValueError, binascii.Error):
        raise ConfigError(
            source, "not a base64 DER public key (copy it from the Event Webhook's settings)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ConfigError(source, "expected an ECDSA P-256 public key")
    return key


def header(headers: Mapping[str, str], name: str) -> str:
    """A header by name, any case (frameworks differ)."""
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return ""


class Verifier:
    def __init__(
        self,
        public_key: str,
        tolerance: float = 300.0,
        source: str = "MAILER_SENDGRID_WEBHOOK_KEY",
    ) -> None:
        self.key = load_key(public_key, source)
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


#: How long a relay's key file, or its absence, is trusted before it is read again (seconds):
#: a subuser added to the keys directory is verified with its own key within that long.
KEY_FRESH = 60.0
#: Relays whose key the process remembers at most (past it the oldest are read again).
KNOWN_KEYS = 4096


class RelayVerifiers:
    """The verifier of each relay: its own key when the keys directory holds a file named
    after it (`MAILER_SENDGRID_WEBHOOK_KEYS_DIR/<relay>`, one SendGrid subuser's key), else the
    fleet's (`MAILER_SENDGRID_WEBHOOK_KEY`). Every file there is checked at start-up, so a bad
    key stops the webhook from starting rather than refusing that tenant's events later."""

    def __init__(self, fleet: Verifier, keys_dir: str = "", tolerance: float = 300.0) -> None:
        self.fleet = fleet
        self.keys_dir = keys_dir
        self.tolerance = tolerance
        self._known: dict[str, tuple[float, Verifier | None]] = {}
        if keys_dir:
            for name in sorted(os.listdir(keys_dir)):
                if RELAY_NAME.match(name):
                    self.for_relay(name)

    def for_relay(self, relay: str) -> Verifier:
        """The verifier for `relay` (a name RELAY_NAME accepts: no path can be made of it).
        Raises ConfigError when its file exists but holds no usable key."""
        if not self.keys_dir:
            return self.fleet
        now = time.monotonic()
        known = self._known.get(relay)
        if known is None or now - known[0] >= KEY_FRESH:
            known = (now, self._read(relay))
            self._known.pop(relay, None)
            if len(self._known) >= KNOWN_KEYS:
                del self._known[next(iter(self._known))]
            self._known[relay] = known
        return known[1] or self.fleet

    def _read(self, relay: str) -> Verifier | None:
        path = os.path.join(self.keys_dir, relay)
        try:
            with open(path, encoding="ascii") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                "MAILER_SENDGRID_WEBHOOK_KEYS_DIR", f"{relay}: unreadable ({type(exc).__name__})"
            ) from None
        return Verifier(text, self.tolerance, f"MAILER_SENDGRID_WEBHOOK_KEYS_DIR/{relay}")
