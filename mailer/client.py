"""The producer: validate and render at enqueue time, then publish by task name.

Rendering happens once, here, in the caller's process: a bad message is refused before it is
accepted, and workers only move bytes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields as dataclass_fields
from functools import partial
from typing import Any

from mailer.config import Settings
from mailer.errors import InvalidMessage
from mailer.message import Message, Rendered
from mailer.profiles import unportable
from mailer.publish import Publisher
from mailer.relays import RelayDirectory
from mailer.schedule import SendAt, cancel, due_time
from mailer.smtpapi import SMTPAPIHeader
from mailer.wire import DEFAULT_RELAY, Payload, to_payload

BATCH_SIZE = 100


class Mailer:
    """Holds the settings and one broker connection pool; safe to share between threads."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self._publisher: Publisher | None = None
        self._relays: RelayDirectory | None = None
        self._lock = threading.Lock()

    @property
    def publisher(self) -> Publisher:
        with self._lock:
            if self._publisher is None:
                self._publisher = Publisher(self.settings)
            return self._publisher

    def render(self, message: Message) -> Rendered:
        return message.render(default_from=self.settings.default_from)

    def lane(self, lane: str | None, field: str = "lane") -> str:
        """The configured lane `lane` names (None: the default one); refused at enqueue."""
        if lane is None:
            return self.settings.default_lane
        names = [configured.name for configured in self.settings.lanes]
        if lane not in names:
            raise InvalidMessage(field, f"{lane!r} is not a lane; MAILER_LANES has {names}")
        return lane

    def relay(self, relay: object, field: str = "relay") -> str:
        """The relay `relay` names (None: `default`); one not configured is refused at enqueue
        (the registry in Redis, cached: mailer/relays.py). `default` costs no Redis call."""
        if relay is None or relay == DEFAULT_RELAY:
            return DEFAULT_RELAY
        with self._lock:
            if self._relays is None:
                self._relays = RelayDirectory(self.settings)
            relays = self._relays
        return relays.check(relay, field)

    def check_portable(self, rendered: Rendered, relay: str, field: str = "relay") -> None:
        """A message using what only SendGrid's X-SMTPAPI does (substitutions, sections,
        templates, ...) is refused at enqueue when its relay cannot read X-SMTPAPI
        (mailer/profiles.py): sent there it would go out with placeholders or without its
        filters."""
        profile: str
        if relay == DEFAULT_RELAY:
            profile = self.settings.relay_profile
        else:
            assert self._relays is not None  # `relay()` checked the name first
            profile = self._relays.profile(relay)
        if profile == "sendgrid":
            return
        blockers = unportable(rendered.data.decode("ascii"))
        if blockers:
            raise InvalidMessage(
                field,
                f"relay {relay!r} (profile {profile}) cannot send what only SendGrid's "
                f"X-SMTPAPI does: {', '.join(blockers)} (docs/profiles.md)",
            )

    def _publish(
        self,
        rendered: Rendered,
        message: Message,
        lane: str,
        due: float | None,
        ignore_suppressions: bool,
        relay: object,
    ) -> None:
        """One rendered message onto its lane's queue (or the schedule), through the relay
        it names once that relay is checked and can send it."""
        via = self.relay(relay)
        self.check_portable(rendered, via)
        payload = to_payload(
            rendered,
            lane,
            due,
            ignore_suppressions=ignore_suppressions,
            asm_group=group_of(message),
            relay=via,
        )
        self.publisher.send(payload, send_at=due)

    def send_message(
        self,
        message: Message,
        *,
        lane: str | None = None,
        send_at: SendAt = None,
        ignore_suppressions: bool = False,
        relay: str | None = None,
    ) -> str:
        """`ignore_suppressions`: send even to suppressed recipients (mail that must go).
        `relay`: the named relay it goes through (docs/relays.md); None: `default`."""
        lane = self.lane(lane)
        due = due_time(send_at)
        rendered = self.render(message)
        self._publish(rendered, message, lane, due, ignore_suppressions, relay)
        return rendered.id

    def send(self, **fields: Any) -> str:
        lane, send_at = fields.pop("lane", None), fields.pop("send_at", None)
        ignore = bool(fields.pop("ignore_suppressions", False))
        relay = fields.pop("relay", None)
        return self.send_message(
            message_from_mapping(fields),
            lane=lane,
            send_at=send_at,
            ignore_suppressions=ignore,
            relay=relay,
        )

    def cancel(self, message_id: str) -> bool:
        """Cancels a scheduled or still-queued message: True when it will not be sent, False
        when it was sent already or its transaction is under way (too late). A cancel that
        races the release or a worker's claim still wins: the ledger records `cancelled`, and a
        worker that finds it acknowledges the message without sending (docs/scheduling.md)."""
        return cancel(self.settings, message_id)

    def send_many(
        self,
        messages: Iterable[Message | Mapping[str, Any]],
        *,
        batch_size: int = BATCH_SIZE,
        lane: str | None = None,
        send_at: SendAt = None,
        relay: str | None = None,
    ) -> list[str]:
        """Renders every message first (one bad message refuses the call, nothing published),
        then publishes them as `mailer.send_batch` tasks over one broker connection. A mapping
        may name its own `lane`, `send_at`, `relay` and `ignore_suppressions`; the arguments
        are the others'."""
        rendered: list[tuple[Rendered, str, float | None]] = []
        options: dict[str, dict[str, Any]] = {}
        for index, item in enumerate(messages):
            try:
                if isinstance(item, Message):
                    message, chosen, ignore = item, self.lane(lane), False
                    due, via = due_time(send_at), self.relay(relay)
                else:
                    fields = dict(item) if isinstance(item, Mapping) else item
                    own = fields.pop("lane", lane) if isinstance(fields, dict) else lane
                    when = fields.pop("send_at", send_at) if isinstance(fields, dict) else send_at
                    route = fields.pop("relay", relay) if isinstance(fields, dict) else relay
                    ignore = bool(fields.pop("ignore_suppressions", False))
                    message, chosen = message_from_mapping(fields), self.lane(own)
                    due, via = due_time(when), self.relay(route)
                one = self.render(message)
                self.check_portable(one, via)
            except InvalidMessage as exc:
                raise InvalidMessage(f"messages[{index}].{exc.field}", exc.problem) from None
            rendered.append((one, chosen, due))
            group = group_of(message)
            if ignore or group is not None or via != DEFAULT_RELAY:
                options[one.id] = {"ignore_suppressions": ignore, "asm_group": group, "relay": via}
        return self.publish_rendered(rendered, batch_size=batch_size, options=options)

    def publish_rendered(
        self,
        rendered: Sequence[Rendered | tuple[Rendered, str] | tuple[Rendered, str, float | None]],
        *,
        batch_size: int = BATCH_SIZE,
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> list[str]:
        """Publishes already-rendered messages (each optionally with its lane and due time) as
        `mailer.send_batch` tasks over one broker connection, one lane and due time per batch
        (for callers that validate everything before publishing anything). `options`: message
        id -> `to_payload` keywords (ignore_suppressions, asm_group, relay) for those that have
        any."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        groups: dict[tuple[str, float | None], list[Payload]] = {}
        ids = []
        for item in rendered:
            if isinstance(item, Rendered):
                one, lane, due = item, self.settings.default_lane, None
            else:
                one, lane, due = item[0], item[1], item[2] if len(item) > 2 else None
            extra = options.get(one.id, {}) if options else {}
            groups.setdefault((lane, due), []).append(to_payload(one, lane, due, **extra))
            ids.append(one.id)
        for (_, due), payloads in groups.items():
            batches = [payloads[i : i + batch_size] for i in range(0, len(payloads), batch_size)]
            self.publisher.send_batches(batches, send_at=due)
        return ids

    async def asend(self, **fields: Any) -> str:
        """Renders in the caller's loop (cheap); checks a named relay (which may read Redis)
        and publishes from a worker thread."""
        lane = self.lane(fields.pop("lane", None))
        due = due_time(fields.pop("send_at", None))
        relay = fields.pop("relay", None)
        ignore = bool(fields.pop("ignore_suppressions", False))
        message = message_from_mapping(fields)
        rendered = self.render(message)

        await asyncio.to_thread(self._publish, rendered, message, lane, due, ignore, relay)
        return rendered.id

    async def asend_many(
        self, messages: Iterable[Message | Mapping[str, Any]], relay: str | None = None
    ) -> list[str]:
        return await asyncio.to_thread(partial(self.send_many, list(messages), relay=relay))

    def close(self) -> None:
        with self._lock:
            if self._publisher is not None:
                self._publisher.close()
                self._publisher = None
            if self._relays is not None:
                self._relays.close()
                self._relays = None


def group_of(message: Message) -> int | None:
    """The message's SendGrid unsubscribe group (`smtpapi` `asm_group_id`), for the workers'
    suppression check (a group unsubscribe suppresses that group's mail only)."""
    api = message.smtpapi
    if api is None:
        return None
    group = (api.to_dict() if isinstance(api, SMTPAPIHeader) else api).get("asm_group_id")
    return group if isinstance(group, int) and not isinstance(group, bool) else None


MESSAGE_FIELDS = frozenset(f.name for f in dataclass_fields(Message))


def message_from_mapping(item: Mapping[str, Any]) -> Message:
    """A mapping of Message fields; an unknown key is an InvalidMessage naming it (not a
    TypeError), so a typo in a bulk file is reported like any other bad field."""
    if not isinstance(item, Mapping):
        raise InvalidMessage("message", f"expected a Message or a dict, got {type(item).__name__}")
    for key in item:
        if key not in MESSAGE_FIELDS:
            raise InvalidMessage(str(key), "not a Message field")
    for key in ("to", "subject"):
        if key not in item:
            raise InvalidMessage(key, "missing")
    return Message(**item)


_default: Mailer | None = None
_default_lock = threading.Lock()


def default_mailer() -> Mailer:
    """The module-level mailer behind `mailer.send`, configured from the environment."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Mailer()
        return _default


def reset_default_mailer() -> None:
    """Forget the default mailer (after the environment changed, e.g. in tests)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
        _default = None
