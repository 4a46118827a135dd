"""SendGrid's X-SMTPAPI header: a validating builder (`SMTPAPIHeader`) and its serialisation.

The header value is one JSON object, ASCII only (non-ASCII escaped as \\uXXXX), serialised with
the default ``", "`` / ``": "`` separators so that it has spaces to fold at. SendGrid parses the
*unfolded* value, so folding (mailer/headers.py `fold_header_value`) may only insert CRLF before
an existing space: unfolding must give back the exact JSON. RFC 2047 encoded-words would make it
invalid JSON, and SendGrid would then drop the message after accepting it ("Invalid SMTPAPI
header").

The module is longer than the others because the builder has one setter group per
SendGrid field, each with that field's rules next to it; splitting it would scatter them.

Longer than most modules because every X-SMTPAPI field has its own SendGrid rule (sizes,
types, counts); each setter is short and they read best side by side.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from mailer.errors import InvalidMessage
from mailer.headers import MAX_LINE, parse_mailbox

__all__ = ["FIELDS", "HEADER_NAME", "SMTPAPIHeader", "header_json", "unique_args_size"]

# Limits from SendGrid's documentation (docs/sendgrid.md, "X-SMTPAPI").
MAX_TO = 10_000
MAX_CATEGORIES = 10
MAX_CATEGORY_LENGTH = 255
MAX_UNIQUE_ARGS_BYTES = 10_000
MAX_SUB_BYTES_PER_RECIPIENT = 10_000
MAX_ASM_GROUPS_TO_DISPLAY = 25
MAX_SCHEDULE_AHEAD = 72 * 3600
# A schedule this far in the past is a bug (a stale job, a wrong clock), not "send now".
MAX_SCHEDULE_PAST = 24 * 3600
MAX_IP_POOL_LENGTH = 64
MAX_BATCH_ID_LENGTH = 255
HEADER_NAME = "X-SMTPAPI"

# The serialisation order of the fields (and the set of keys `from_dict` accepts).
FIELDS: tuple[str, ...] = (
    "to",
    "sub",
    "section",
    "category",
    "unique_args",
    "filters",
    "asm_group_id",
    "asm_groups_to_display",
    "send_at",
    "send_each_at",
    "batch_id",
    "ip_pool",
)

_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]+")
_NO_SPACE_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")
_FILTER_NAME = re.compile(r"[a-z0-9_]+")
_FILTER_SETTING = re.compile(r"[a-z0-9_./-]+")
_WHITESPACE = re.compile(r"\s")


# ---------------------------------------------------------------------------------------------
# Value checks


def _field(name: str) -> str:
    return f"smtpapi.{name}"


def _check_str(field: str, value: object, what: str = "value") -> str:
    if not isinstance(value, str):
        raise InvalidMessage(
            field, f"{what}s must be strings (SendGrid's rule), got {type(value).__name__}"
        )
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidMessage(field, f"a {what} is not valid Unicode (lone surrogate)") from None
    return value


def _check_int(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidMessage(field, f"must be an integer, got {type(value).__name__}")
    return value


def _check_list(field: str, value: object) -> list[Any]:
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise InvalidMessage(field, f"must be a list, got {type(value).__name__}")
    return list(value)


def _check_mapping(field: str, value: object) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise InvalidMessage(field, f"must be an object (dict), got {type(value).__name__}")
    return value


def _check_category(value: object) -> str:
    field = _field("category")
    if not isinstance(value, str):
        raise InvalidMessage(field, f"each category must be a string, got {type(value).__name__}")
    if not value or not _PRINTABLE_ASCII.fullmatch(value):
        raise InvalidMessage(
            field, f"{value!r}: a category must be non-empty printable 7-bit US-ASCII"
        )
    if len(value) > MAX_CATEGORY_LENGTH:
        raise InvalidMessage(field, f"a category is at most {MAX_CATEGORY_LENGTH} characters")
    return value


def _check_timestamp(field: str, value: object) -> int:
    value = _check_int(field, value)
    if value <= 0:
        raise InvalidMessage(field, f"{value} is not a UNIX timestamp in seconds")
    return value


def _check_window(field: str, ts: int, now: float) -> None:
    if ts > now + MAX_SCHEDULE_AHEAD:
        raise InvalidMessage(
            field,
            f"{ts} is more than 72 hours ahead (SendGrid's limit); is it in milliseconds?",
        )
    if ts < now - MAX_SCHEDULE_PAST:
        raise InvalidMessage(field, f"{ts} is more than 24 hours in the past")


def _check_group(field: str, value: object) -> int:
    value = _check_int(field, value)
    if value <= 0:
        raise InvalidMessage(field, f"{value} is not an unsubscribe group id")
    return value


_LONG_RUN = re.compile(f"[^ ]{{{MAX_LINE},}}")


def _check_foldable(data: Mapping[str, Any], text: str) -> None:
    """Refuses a header that has a token too long to fold, naming the field it is in."""
    if not _LONG_RUN.search(text):
        return
    for key, value in data.items():
        match = _LONG_RUN.search(header_json({key: value}))
        if match:
            raise InvalidMessage(
                _field(key),
                f"has a run of {len(match.group())} characters without a space once "
                "serialised (non-ASCII counts 6 per character as \\uXXXX); X-SMTPAPI can only "
                f"be folded at spaces and lines are limited to {MAX_LINE} octets",
            )
    raise InvalidMessage("smtpapi", "cannot be folded into lines of at most 998 octets")


def header_json(data: Mapping[str, Any]) -> str:
    """The header's JSON: ASCII only, default separators, and no "=?" (written "\\u003d?"),
    so that nothing on the way can take a piece of it for an RFC 2047 encoded-word."""
    # "=" only ever appears literally inside JSON strings (no escape sequence contains it),
    # so the replacement is exact: json.loads gives back the same data.
    return json.dumps(data, ensure_ascii=True).replace("=?", "\\u003d?")


def unique_args_size(args: Mapping[str, str]) -> int:
    """Size of `unique_args` as it is serialised in the header."""
    return len(header_json(args))


# ---------------------------------------------------------------------------------------------
# The builder


class SMTPAPIHeader:
    """Builds and validates an X-SMTPAPI header.

    Setters check their own argument at once and return `self` (so calls chain); checks that
    involve several fields or the clock (lengths matching `to`, `send_at` vs `send_each_at`,
    the 72-hour window, sizes) run in `validate()`, which `to_dict()` and `to_json()` call.
    Every problem raises `InvalidMessage("smtpapi.<field>", ...)`.

        SMTPAPIHeader().add_to("a@x.com").add_substitution("-name-", "Ann").add_category("news")
        SMTPAPIHeader(category="news", unique_args={"campaign": "7"})
        SMTPAPIHeader.from_dict({"category": ["news"], "asm_group_id": 42})
    """

    def __init__(
        self,
        *,
        to: Iterable[str] | None = None,
        sub: Mapping[str, Iterable[str]] | None = None,
        section: Mapping[str, str] | None = None,
        category: str | Iterable[str] | None = None,
        unique_args: Mapping[str, str] | None = None,
        filters: Mapping[str, Mapping[str, Any]] | None = None,
        asm_group_id: int | None = None,
        asm_groups_to_display: Iterable[int] | None = None,
        send_at: int | None = None,
        send_each_at: Iterable[int] | None = None,
        batch_id: str | None = None,
        ip_pool: str | None = None,
    ) -> None:
        self._to: list[str] = []
        self._sub: dict[str, list[str]] = {}
        self._section: dict[str, str] = {}
        self._category: str | list[str] | None = None
        self._unique_args: dict[str, str] = {}
        self._filters: dict[str, dict[str, dict[str, str | int]]] = {}
        self._asm_group_id: int | None = None
        self._asm_groups_to_display: list[int] = []
        self._send_at: int | None = None
        self._send_each_at: list[int] = []
        self._batch_id: str | None = None
        self._ip_pool: str | None = None
        if to is not None:
            self.set_tos(to)
        if sub is not None:
            self.set_substitutions(sub)
        if section is not None:
            self.set_sections(section)
        if category is not None:
            self.set_categories(category)
        if unique_args is not None:
            self.set_unique_args(unique_args)
        if filters is not None:
            self.set_filters(filters)
        if asm_group_id is not None:
            self.set_asm_group_id(asm_group_id)
        if asm_groups_to_display is not None:
            self.set_asm_groups_to_display(asm_groups_to_display)
        if send_at is not None:
            self.set_send_at(send_at)
        if send_each_at is not None:
            self.set_send_each_at(send_each_at)
        if batch_id is not None:
            self.set_batch_id(batch_id)
        if ip_pool is not None:
            self.set_ip_pool(ip_pool)

    # -- construction from a plain dict --------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SMTPAPIHeader:
        """Builds a header from a dict of X-SMTPAPI fields; unknown keys are refused."""
        if isinstance(data, SMTPAPIHeader):
            return data.copy()
        if not isinstance(data, Mapping):
            raise InvalidMessage(
                "smtpapi", f"expected an SMTPAPIHeader or a dict, got {type(data).__name__}"
            )
        for key in data:
            if key not in FIELDS:
                raise InvalidMessage(
                    _field(str(key)),
                    f"unknown X-SMTPAPI field {key!r}; known fields: {', '.join(FIELDS)}",
                )
        return cls(**{key: value for key, value in data.items() if value is not None})

    def copy(self) -> SMTPAPIHeader:
        """An independent copy (the containers are copied; values are immutable)."""
        new = SMTPAPIHeader()
        for name, value in self._raw_dict().items():
            setattr(new, f"_{name}", value)
        return new

    # -- recipients ----------------------------------------------------------------------------

    def add_to(self, address: str) -> SMTPAPIHeader:
        """Adds one recipient, ``"a@x.com"`` or ``"Name <a@x.com>"`` (kept as given)."""
        if len(self._to) >= MAX_TO:
            raise InvalidMessage(_field("to"), f"at most {MAX_TO} recipients (SendGrid's limit)")
        parse_mailbox(_field("to"), address)
        self._to.append(address)
        return self

    def set_tos(self, addresses: Iterable[str]) -> SMTPAPIHeader:
        items = _check_list(_field("to"), addresses)
        if len(items) > MAX_TO:
            raise InvalidMessage(
                _field("to"), f"{len(items)} recipients; at most {MAX_TO} (SendGrid's limit)"
            )
        for item in items:
            parse_mailbox(_field("to"), item)
        self._to = items
        return self

    # -- substitutions and sections ------------------------------------------------------------

    def _check_tag(self, field: str, tag: object) -> str:
        if not isinstance(tag, str) or not tag:
            raise InvalidMessage(field, f"a tag must be a non-empty string, got {tag!r}")
        if _WHITESPACE.search(tag):
            raise InvalidMessage(field, f"{tag!r}: a tag may not contain spaces")
        return _check_str(field, tag, "tag")

    def add_substitution(self, tag: str, value: str) -> SMTPAPIHeader:
        """Appends the value of `tag` for the next recipient (values follow the `to` order)."""
        field = _field("sub")
        self._check_tag(field, tag)
        self._sub.setdefault(tag, []).append(_check_str(field, value))
        return self

    def set_substitutions(self, sub: Mapping[str, Iterable[str]]) -> SMTPAPIHeader:
        field = _field("sub")
        new: dict[str, list[str]] = {}
        for tag, values in _check_mapping(field, sub).items():
            self._check_tag(field, tag)
            new[tag] = [_check_str(field, v) for v in _check_list(field, values)]
        self._sub = new
        return self

    def _warn_section(self) -> None:
        warnings.warn(
            "X-SMTPAPI 'section' is deprecated and has been removed by SendGrid; section tags "
            "will not be replaced. Put the text in 'sub' values instead.",
            FutureWarning,
            stacklevel=3,
        )

    def add_section(self, tag: str, value: str) -> SMTPAPIHeader:
        """Deprecated by SendGrid (removed upstream): accepted with a FutureWarning."""
        field = _field("section")
        self._check_tag(field, tag)
        self._section[tag] = _check_str(field, value)
        self._warn_section()
        return self

    def set_sections(self, section: Mapping[str, str]) -> SMTPAPIHeader:
        field = _field("section")
        new: dict[str, str] = {}
        for tag, value in _check_mapping(field, section).items():
            self._check_tag(field, tag)
            new[tag] = _check_str(field, value)
        self._section = new
        if new:
            self._warn_section()
        return self

    # -- categories and unique arguments -------------------------------------------------------

    def add_category(self, category: str) -> SMTPAPIHeader:
        category = _check_category(category)
        current = self._category
        categories = [] if current is None else [current] if isinstance(current, str) else current
        if len(categories) >= MAX_CATEGORIES:
            raise InvalidMessage(_field("category"), f"at most {MAX_CATEGORIES} categories")
        self._category = [*categories, category]
        return self

    def set_categories(self, categories: str | Iterable[str]) -> SMTPAPIHeader:
        """A string stays a string in the JSON (webhooks echo the same shape), a list a list."""
        if isinstance(categories, str):
            self._category = _check_category(categories)
            return self
        items = [_check_category(c) for c in _check_list(_field("category"), categories)]
        if len(items) > MAX_CATEGORIES:
            raise InvalidMessage(
                _field("category"), f"{len(items)} categories; at most {MAX_CATEGORIES}"
            )
        self._category = items
        return self

    def set_unique_arg(self, key: str, value: str) -> SMTPAPIHeader:
        field = _field("unique_args")
        if not isinstance(key, str) or not key:
            raise InvalidMessage(field, f"a key must be a non-empty string, got {key!r}")
        _check_str(field, key, "key")
        self._unique_args[key] = _check_str(field, value)
        return self

    def set_unique_args(self, args: Mapping[str, str]) -> SMTPAPIHeader:
        previous = self._unique_args
        self._unique_args = {}
        try:
            for key, value in _check_mapping(_field("unique_args"), args).items():
                self.set_unique_arg(key, value)
        except InvalidMessage:
            self._unique_args = previous
            raise
        return self

    # -- filters -------------------------------------------------------------------------------

    def add_filter(self, name: str, setting: str, value: str | int) -> SMTPAPIHeader:
        """Sets ``filters[name]["settings"][setting] = value`` (booleans are sent as 0/1)."""
        field = _field("filters")
        if not isinstance(name, str) or not _FILTER_NAME.fullmatch(name):
            raise InvalidMessage(field, f"{name!r}: filter names are lowercase, like 'clicktrack'")
        if not isinstance(setting, str) or not _FILTER_SETTING.fullmatch(setting):
            raise InvalidMessage(
                field, f"{setting!r}: setting names are lowercase, like 'enable' or 'text/html'"
            )
        if isinstance(value, bool):
            value = int(value)
        elif isinstance(value, str):
            _check_str(field, value)
        elif not isinstance(value, int):
            raise InvalidMessage(
                field,
                f"{name}.{setting}: a setting value is a string or an integer (0/1), "
                f"got {type(value).__name__}",
            )
        self._filters.setdefault(name, {"settings": {}})["settings"][setting] = value
        return self

    def set_filters(self, filters: Mapping[str, Mapping[str, Any]]) -> SMTPAPIHeader:
        field = _field("filters")
        previous = self._filters
        self._filters = {}
        try:
            for name, spec in _check_mapping(field, filters).items():
                spec = _check_mapping(field, spec)
                if set(spec) != {"settings"}:
                    raise InvalidMessage(
                        field, f"{name!r}: expected {{'settings': {{...}}}}, got keys {list(spec)}"
                    )
                settings = _check_mapping(field, spec["settings"])
                if not settings:
                    raise InvalidMessage(field, f"{name!r}: no settings")
                for setting, value in settings.items():
                    self.add_filter(name, setting, value)
        except InvalidMessage:
            self._filters = previous
            raise
        return self

    # -- suppression groups, scheduling, batches, pools ----------------------------------------

    def set_asm_group_id(self, group_id: int) -> SMTPAPIHeader:
        self._asm_group_id = _check_group(_field("asm_group_id"), group_id)
        return self

    def set_asm_groups_to_display(self, group_ids: Iterable[int]) -> SMTPAPIHeader:
        field = _field("asm_groups_to_display")
        items = [_check_group(field, g) for g in _check_list(field, group_ids)]
        if len(items) > MAX_ASM_GROUPS_TO_DISPLAY:
            raise InvalidMessage(field, f"{len(items)} groups; at most {MAX_ASM_GROUPS_TO_DISPLAY}")
        self._asm_groups_to_display = items
        return self

    def set_send_at(self, timestamp: int) -> SMTPAPIHeader:
        """A UNIX timestamp in seconds, at most 72 hours ahead (checked by `validate`)."""
        self._send_at = _check_timestamp(_field("send_at"), timestamp)
        return self

    def set_send_each_at(self, timestamps: Iterable[int]) -> SMTPAPIHeader:
        """One UNIX timestamp per `to` recipient, in the same order."""
        field = _field("send_each_at")
        self._send_each_at = [_check_timestamp(field, t) for t in _check_list(field, timestamps)]
        return self

    def add_send_each_at(self, timestamp: int) -> SMTPAPIHeader:
        self._send_each_at.append(_check_timestamp(_field("send_each_at"), timestamp))
        return self

    def set_batch_id(self, batch_id: str) -> SMTPAPIHeader:
        field = _field("batch_id")
        if not isinstance(batch_id, str) or not _NO_SPACE_PRINTABLE_ASCII.fullmatch(batch_id):
            raise InvalidMessage(field, f"{batch_id!r}: expected a batch id from /v3/mail/batch")
        if len(batch_id) > MAX_BATCH_ID_LENGTH:
            raise InvalidMessage(field, f"at most {MAX_BATCH_ID_LENGTH} characters")
        self._batch_id = batch_id
        return self

    def set_ip_pool(self, ip_pool: str) -> SMTPAPIHeader:
        field = _field("ip_pool")
        if not isinstance(ip_pool, str) or not _PRINTABLE_ASCII.fullmatch(ip_pool):
            raise InvalidMessage(field, f"{ip_pool!r}: expected an IP pool name")
        if len(ip_pool) > MAX_IP_POOL_LENGTH:
            raise InvalidMessage(field, f"at most {MAX_IP_POOL_LENGTH} characters")
        self._ip_pool = ip_pool
        return self

    # -- reading -------------------------------------------------------------------------------

    @property
    def to(self) -> tuple[str, ...]:
        return tuple(self._to)

    @property
    def unique_args(self) -> dict[str, str]:
        return dict(self._unique_args)

    def _raw_dict(self) -> dict[str, Any]:
        """The set fields, as fresh containers, without the cross-field checks."""
        out: dict[str, Any] = {}
        if self._to:
            out["to"] = list(self._to)
        if self._sub:
            out["sub"] = {tag: list(values) for tag, values in self._sub.items()}
        if self._section:
            out["section"] = dict(self._section)
        if self._category is not None and self._category != []:
            category = self._category
            out["category"] = category if isinstance(category, str) else list(category)
        if self._unique_args:
            out["unique_args"] = dict(self._unique_args)
        if self._filters:
            out["filters"] = {
                name: {"settings": dict(spec["settings"])} for name, spec in self._filters.items()
            }
        if self._asm_group_id is not None:
            out["asm_group_id"] = self._asm_group_id
        if self._asm_groups_to_display:
            out["asm_groups_to_display"] = list(self._asm_groups_to_display)
        if self._send_at is not None:
            out["send_at"] = self._send_at
        if self._send_each_at:
            out["send_each_at"] = list(self._send_each_at)
        if self._batch_id is not None:
            out["batch_id"] = self._batch_id
        if self._ip_pool is not None:
            out["ip_pool"] = self._ip_pool
        return out

    def validate(self, now: float | None = None) -> None:
        """The checks that involve several fields, sizes or the clock (`now`, UNIX seconds)."""
        self._validated_dict(now)

    def _validated_dict(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        n_to = len(self._to)
        if self._sub and n_to:
            for tag, values in self._sub.items():
                if len(values) != n_to:
                    raise InvalidMessage(
                        _field("sub"),
                        f"{tag!r} has {len(values)} values for {n_to} 'to' recipients; "
                        "each list needs one value per recipient, in order",
                    )
            per_recipient = [0] * n_to
            for tag, values in self._sub.items():
                tag_size = len(tag.encode("utf-8"))
                for i, value in enumerate(values):
                    per_recipient[i] += tag_size + len(value.encode("utf-8"))
            worst = max(per_recipient)
            if worst > MAX_SUB_BYTES_PER_RECIPIENT:
                raise InvalidMessage(
                    _field("sub"),
                    f"{worst} bytes of substitutions for recipient "
                    f"{per_recipient.index(worst)}; at most {MAX_SUB_BYTES_PER_RECIPIENT}",
                )
        if self._send_at is not None and self._send_each_at:
            raise InvalidMessage(
                _field("send_each_at"),
                "give send_at or send_each_at, not both (SendGrid drops such a message)",
            )
        if self._send_each_at:
            if len(self._send_each_at) != n_to:
                raise InvalidMessage(
                    _field("send_each_at"),
                    f"{len(self._send_each_at)} timestamps for {n_to} 'to' recipients; "
                    "it needs one per recipient",
                )
            for ts in self._send_each_at:
                _check_window(_field("send_each_at"), ts, now)
        if self._send_at is not None:
            _check_window(_field("send_at"), self._send_at, now)
        if self._unique_args:
            size = unique_args_size(self._unique_args)
            if size > MAX_UNIQUE_ARGS_BYTES:
                raise InvalidMessage(
                    _field("unique_args"),
                    f"{size} bytes serialised; at most {MAX_UNIQUE_ARGS_BYTES} (SendGrid's limit)",
                )
        data = self._raw_dict()
        _check_foldable(data, header_json(data))
        return data

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """The validated fields as a new plain dict (unset and empty fields left out)."""
        return self._validated_dict(now)

    def to_json(self, now: float | None = None) -> str:
        """ASCII-only JSON with the ", " and ": " separators (their spaces are fold points)."""
        return header_json(self._validated_dict(now))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SMTPAPIHeader):
            return NotImplemented
        return self._raw_dict() == other._raw_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = self._raw_dict()
        if "to" in fields:
            fields["to"] = f"<{len(self._to)} recipients>"
        return f"SMTPAPIHeader({fields!r})"
