"""The wire contract between producers (`mailer`) and workers: queues, task names, the payload.

Everything that crosses the broker is named here and nowhere else: the queue of each lane, the
two task names, the payload's version and shape, and the task's argument shape. The producer
builds payloads with `to_payload`; the worker reads every task it receives with `send_args` /
`batch_args`, which refuse (with `InvalidPayload` naming the key) anything this module would not
have produced, so a payload published by anything else (a raw LPUSH, Flower's send-task, an old
or foreign producer) is dead-lettered as `invalid` and never sent. docs/wire.md has the details.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NotRequired, TypedDict

from mailer.errors import InvalidMessage
from mailer.guard import check_wire
from mailer.message import PAYLOAD_VERSION, Rendered

__all__ = [
    "BATCH_TASK",
    "DEFAULT_LANE",
    "DEFAULT_RELAY",
    "LEDGER_PREFIX",
    "PAYLOAD_VERSION",
    "QUEUE",
    "RELAYS",
    "RELAYS_VERSION",
    "RELAY_NAME",
    "SCHEDULE_DUE",
    "SCHEDULE_ITEMS",
    "SEND_TASK",
    "InvalidPayload",
    "Meta",
    "Payload",
    "batch_args",
    "from_payload",
    "group_of",
    "ignores_suppressions",
    "message_id_of",
    "queue_for",
    "relay_of",
    "send_args",
    "to_payload",
]

#: The default lane's queue (the only queue before lanes existed; kept for rolling upgrades).
QUEUE = "mailer"
DEFAULT_LANE = "default"
DEFAULT_RELAY = "default"
#: A relay's name: what `mailer.send(relay=...)` takes and what labels its metrics and keys.
RELAY_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
SEND_TASK = "mailer.send"
BATCH_TASK = "mailer.send_batch"
#: Payloads per `mailer.send_batch` task: one broker round trip carries this many messages.
MAX_BATCH = 1000

#: Producers and workers both touch these Redis keys. The ledger (state Redis): + message id,
#: one record per message (docs/ledger.md); `mailer.cancel` writes `cancelled` there.
LEDGER_PREFIX = "mailer:ledger:"
#: The durable schedule (broker Redis, beside the queues it releases into): message or task id
#: -> due time (ZSET), and id -> "<queue>\n<broker message>" (HASH). docs/scheduling.md.
SCHEDULE_DUE = "mailer:schedule:due"
SCHEDULE_ITEMS = "mailer:schedule:items"
#: The named relays (state Redis; mailer/relays.py): name -> JSON spec (never a secret), and
#: a counter bumped on every change, which producers and workers poll to re-read the hash.
RELAYS = "mailer:relays"
RELAYS_VERSION = "mailer:relays:version"


class Meta(TypedDict):
    """Display and policy data: never needed to send the bytes, never a secret."""

    subject: str
    to: list[str]
    idempotency_key: str | None
    created_at: float
    lane: NotRequired[str]
    send_at: NotRequired[float]  # UNIX time it was scheduled for (display only)
    #: True: sent even to suppressed recipients (mail that must go: legal notices).
    ignore_suppressions: NotRequired[bool]
    #: The message's SendGrid unsubscribe group (`asm_group_id`): its list is checked too.
    asm_group: NotRequired[int]
    #: The named relay it goes through (mailer/relays.py); absent: the `default` relay.
    relay: NotRequired[str]


class Payload(TypedDict):
    """One message as it travels: the envelope and the rendered RFC 5322 bytes (ASCII)."""

    v: int
    id: str
    mail_from: str
    rcpt_to: list[str]
    data: str
    meta: Meta


class InvalidPayload(ValueError):
    """A task whose arguments this contract does not describe; the text names the key."""


def queue_for(lane: str) -> str:
    """The broker queue of `lane`: the default lane keeps the historical queue name."""
    return QUEUE if lane == DEFAULT_LANE else f"{QUEUE}.{lane}"


def to_payload(
    rendered: Rendered,
    lane: str = DEFAULT_LANE,
    send_at: float | None = None,
    *,
    ignore_suppressions: bool = False,
    asm_group: int | None = None,
    relay: str = DEFAULT_RELAY,
) -> Payload:
    payload: Payload = rendered.to_payload()  # type: ignore[assignment]
    if lane != DEFAULT_LANE:
        payload["meta"]["lane"] = lane
    if send_at is not None:
        payload["meta"]["send_at"] = send_at
    if ignore_suppressions:
        payload["meta"]["ignore_suppressions"] = True
    if asm_group is not None:
        payload["meta"]["asm_group"] = asm_group
    if relay != DEFAULT_RELAY:
        payload["meta"]["relay"] = relay
    return payload


def ignores_suppressions(payload: Mapping[str, Any]) -> bool:
    return payload.get("meta", {}).get("ignore_suppressions") is True


def group_of(payload: Mapping[str, Any]) -> int | None:
    group = payload.get("meta", {}).get("asm_group")
    return group if isinstance(group, int) and not isinstance(group, bool) else None


def relay_of(payload: Mapping[str, Any]) -> str:
    relay = payload.get("meta", {}).get("relay", DEFAULT_RELAY)
    return relay if isinstance(relay, str) else DEFAULT_RELAY


def lane_of(payload: Mapping[str, Any]) -> str:
    lane = payload.get("meta", {}).get("lane", DEFAULT_LANE)
    return lane if isinstance(lane, str) else DEFAULT_LANE


def from_payload(value: object) -> Rendered:
    """The message a payload carries; strict, so nothing half-understood is ever sent."""
    if isinstance(value, Mapping) and isinstance(value.get("meta"), Mapping):
        meta = value["meta"]
        lane = meta.get("lane", DEFAULT_LANE)
        if not isinstance(lane, str) or not lane.isidentifier():
            raise InvalidPayload("payload['meta']['lane']: expected a lane name")
        send_at = meta.get("send_at", 0.0)
        if isinstance(send_at, bool) or not isinstance(send_at, int | float):
            raise InvalidPayload("payload['meta']['send_at']: expected a UNIX time")
        if "ignore_suppressions" in meta and not isinstance(meta["ignore_suppressions"], bool):
            raise InvalidPayload("payload['meta']['ignore_suppressions']: expected true or false")
        group = meta.get("asm_group", 0)
        if isinstance(group, bool) or not isinstance(group, int) or group < 0:
            raise InvalidPayload("payload['meta']['asm_group']: expected a group id (integer)")
        relay = meta.get("relay", DEFAULT_RELAY)
        if not isinstance(relay, str) or not RELAY_NAME.match(relay):
            raise InvalidPayload("payload['meta']['relay']: expected a relay name")
        optional = ("lane", "send_at", "ignore_suppressions", "asm_group", "relay")
        if any(k in meta for k in optional):
            value = {**value, "meta": {k: v for k, v in meta.items() if k not in optional}}
    try:
        rendered = Rendered.from_payload(value)  # type: ignore[arg-type]
    except InvalidPayload:
        raise
    except (ValueError, TypeError) as exc:
        raise InvalidPayload(str(exc)) from None
    try:
        check_wire(rendered.data)  # whatever produced it: what render would have refused
    except InvalidMessage as exc:
        raise InvalidPayload(f"payload['data']: {exc}") from None
    return rendered


def send_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], int, str]:
    """(payload, attempts, released) of a `mailer.send` task: `(payload,)` plus the worker's own
    retry bookkeeping (`attempts`, `released`) as keyword arguments."""
    if len(args) != 1:
        raise InvalidPayload(f"mailer.send takes one payload argument, got {len(args)}")
    unknown = set(kwargs) - {"attempts", "released"}
    if unknown:
        raise InvalidPayload(f"mailer.send: unknown keyword arguments {sorted(unknown)}")
    attempts = kwargs.get("attempts", 0)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise InvalidPayload("mailer.send: 'attempts' must be a non-negative integer")
    released = kwargs.get("released", "")
    if not isinstance(released, str):
        raise InvalidPayload("mailer.send: 'released' must be a string")
    from_payload(args[0])
    return args[0], attempts, released


def batch_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Any]:
    """The payloads of a `mailer.send_batch` task, each still to be checked with `from_payload`
    (one bad message of a batch is dead-lettered alone)."""
    if kwargs:
        raise InvalidPayload(f"mailer.send_batch: unknown keyword arguments {sorted(kwargs)}")
    if len(args) != 1 or not isinstance(args[0], list):
        raise InvalidPayload("mailer.send_batch takes one argument, a list of payloads")
    if not 0 < len(args[0]) <= MAX_BATCH:
        raise InvalidPayload(f"mailer.send_batch: 1 to {MAX_BATCH} payloads, got {len(args[0])}")
    return args[0]


def message_id_of(value: object, fallback: str) -> str:
    """The id to file an invalid payload under: its own when it looks like ours, else
    `fallback` (the task id)."""
    if isinstance(value, Mapping):
        mid = value.get("id")
        if isinstance(mid, str) and len(mid) == 32 and all(c in "0123456789abcdef" for c in mid):
            return mid
    return fallback
