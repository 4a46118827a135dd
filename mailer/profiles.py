"""Relay profiles: what a relay understands of SendGrid's X-SMTPAPI header, and the rewrite of a
rendered message's header block for one that does not read it (docs/profiles.md).

Messages are rendered once, at enqueue, for SendGrid: categories, unique arguments, the
unsubscribe group, `send_at`, filters and substitutions travel in X-SMTPAPI. The worker sends
through whichever relay the message names or fails over to, and a relay of another profile
either gets the parts it has an equivalent for in its own headers or none of them:

    sendgrid   X-SMTPAPI kept as it is (the message is not even parsed)
    ses        category and unique_args as X-SES-MESSAGE-TAGS; X-SES-CONFIGURATION-SET
    postmark   the first category as X-PM-Tag, unique_args as X-PM-Metadata-<key>
    smtp       nothing

Only the header block changes; what has no equivalent is dropped and named in the note (which
goes into the message's status record). What would make the message wrong rather than poorer
(a fan-out to X-SMTPAPI `to`, substitution tags left in the body, a legacy template, a future
`send_at`) is *not portable*: `adapt` refuses it (`Unportable`) and the failover router never
sends it to a relay of such a profile.

This module is the producer's as well as the worker's (nothing here touches Redis or the
network), so a producer can refuse at enqueue a message its own relay could not render.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from mailer.guard import check_wire
from mailer.headers import fold_header_value
from mailer.smtpapi import FIELDS, HEADER_NAME

__all__ = [
    "PROFILE_NAMES",
    "Adapted",
    "ProfileName",
    "Unportable",
    "adapt",
    "blockers",
    "check_configuration_set",
    "portable",
    "unportable",
]

ProfileName = Literal["sendgrid", "ses", "postmark", "smtp"]
PROFILE_NAMES: tuple[ProfileName, ...] = ("sendgrid", "ses", "postmark", "smtp")

# SES (MessageTag, and the SES-specific headers of its SMTP interface).
SES_TAGS = "X-SES-MESSAGE-TAGS"
SES_CONFIGURATION_SET = "X-SES-CONFIGURATION-SET"
#: A tag's name and value: ASCII letters, digits, "_" and "-", at most 256 characters.
SES_TAG_TEXT = re.compile(r"[A-Za-z0-9_-]{1,256}")
#: A configuration set's name, as SES allows it (letters, digits, "_", "-"; at most 64).
SES_SET_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Postmark (SMTP headers it reads and removes before delivery).
PM_TAG = "X-PM-Tag"
PM_METADATA = "X-PM-Metadata-"
#: Metadata: at most 10 fields, names up to 20 characters, values up to 80 (Postmark's limits).
PM_MAX_FIELDS = 10
PM_KEY = re.compile(r"[A-Za-z0-9_-]{1,20}")
PM_VALUE = re.compile(r"[\x20-\x7e]{1,80}")
#: One tag per message; our categories are at most 255 characters (mailer/smtpapi.py).
PM_TAG_TEXT = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?")

_OURS = f"\r\n{HEADER_NAME}:"
_FIELD = re.compile(r"^x-smtpapi:", re.IGNORECASE | re.MULTILINE)
_NAMES = re.compile(r"^([!-9;-~]+):", re.MULTILINE)
#: The headers a profile writes start with these (lower case): the message may have its own.
_OWN_PREFIX = {"ses": "\nx-ses-", "postmark": "\nx-pm-"}
#: The note goes into the status record's `reason`, which keeps 200 characters.
MAX_NOTE = 200
#: The unique argument the mailer adds to every message (mailer/render.py): kept first.
OWN_ID = "mailer_id"


class Unportable(ValueError):
    """The message's X-SMTPAPI asks for what only SendGrid does; sent anywhere else it would be
    wrong (recipients missing, placeholders unrendered), not merely poorer. `fields` names it."""

    def __init__(self, profile: str, fields: tuple[str, ...]) -> None:
        self.profile = profile
        self.fields = fields
        super().__init__(
            f"X-SMTPAPI {', '.join(fields)}: only SendGrid can do it; a relay of profile "
            f"{profile!r} would send the message wrong (docs/profiles.md)"
        )


class Adapted(NamedTuple):
    """The message as the relay gets it; `note` says what was translated and dropped ("" when
    nothing changed), `dropped` lists the X-SMTPAPI parts that were lost. (A tuple: made for
    every message, and a frozen dataclass costs several times as much to build.)"""

    data: str
    note: str = ""
    dropped: tuple[str, ...] = ()


def check_configuration_set(name: str) -> str:
    """`name` if SES would take it as a configuration set; ValueError naming the rule if not
    (for the relay configuration to call at start-up, not per message)."""
    if not isinstance(name, str) or not SES_SET_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not an SES configuration set name: 1 to 64 ASCII letters, digits, "
            "'_' or '-'"
        )
    return name


# ---------------------------------------------------------------------------------------------
# What only SendGrid can do


def _enabled(spec: object) -> Mapping[str, Any] | None:
    """An X-SMTPAPI filter's settings when it is enabled, else None."""
    settings = spec.get("settings") if isinstance(spec, Mapping) else None
    if isinstance(settings, Mapping) and settings.get("enable") in (1, "1", True):
        return settings
    return None


def blockers(api: Mapping[str, Any], body: str = "", now: float | None = None) -> tuple[str, ...]:
    """The X-SMTPAPI fields of `api` that no other profile can honour without sending the
    message wrong: `to` (SendGrid's fan-out; the envelope has only the first recipient), `sub`
    and `section` (tags left in the text), `send_each_at`, a `send_at` still in the future (it
    would go now), the `templates` and `bcc` filters, `subscriptiontrack` with a `replace` tag,
    and `asm_group_id` when `body` uses SendGrid's `<%asm_...%>` tags."""
    found: list[str] = [name for name in ("to", "sub", "section", "send_each_at") if api.get(name)]
    send_at = api.get("send_at")
    future = time.time() if now is None else now
    if isinstance(send_at, int | float) and not isinstance(send_at, bool) and send_at > future:
        found.append("send_at")
    filters = api.get("filters")
    if isinstance(filters, Mapping):
        found += [f"filters.{n}" for n in ("templates", "bcc") if _enabled(filters.get(n))]
        track = _enabled(filters.get("subscriptiontrack"))
        if track is not None and "replace" in track:
            found.append("filters.subscriptiontrack")
    if api.get("asm_group_id") and "<%asm_" in body:
        found.append("asm_group_id")
    return tuple(found)


# ---------------------------------------------------------------------------------------------
# Finding and reading X-SMTPAPI in the rendered text


def _header_end(data: str) -> int:
    end = data.find("\r\n\r\n")
    return len(data) if end < 0 else end


def _locate(head: str) -> tuple[int, int] | None:
    """(start, end) of the X-SMTPAPI field in `head`, continuation lines included, without the
    CRLF that ends it."""
    start = head.find(_OURS)  # as mailer/render.py writes it: never the first line
    if start >= 0:
        start += 2
    else:  # another producer's spelling, or first
        match = _FIELD.search(head)
        if match is None:
            return None
        start = match.start()
    end = start
    while True:
        end = head.find("\r\n", end)
        if end < 0:
            return start, len(head)
        if head[end + 2 : end + 3] not in (" ", "\t"):
            return start, end
        end += 2


def _parse(field: str) -> dict[str, Any] | None:
    """The JSON of an X-SMTPAPI field (folding only ever inserted CRLF before a space)."""
    value = field.partition(":")[2].replace("\r\n", "").strip()
    try:
        api = json.loads(value)
    except ValueError:
        return None
    return api if isinstance(api, dict) else None


def unportable(data: str, now: float | None = None) -> tuple[str, ...]:
    """`blockers` of a rendered message's X-SMTPAPI (empty: any profile can send it)."""
    head_end = _header_end(data)
    where = _locate(data[:head_end])
    if where is None:
        return ()
    api = _parse(data[where[0] : where[1]])
    return () if api is None else blockers(api, data[head_end:], now)


def portable(data: str, now: float | None = None) -> bool:
    """Whether a relay of any profile can send this rendered message faithfully."""
    return not unportable(data, now)


# ---------------------------------------------------------------------------------------------
# Translation


def _categories(api: Mapping[str, Any]) -> list[str]:
    value = api.get("category")
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [c for c in items if isinstance(c, str)]


def _unique_args(api: Mapping[str, Any], dropped: list[str]) -> dict[str, str]:
    """unique_args as strings, our `mailer_id` first; anything else is dropped by name."""
    value = api.get("unique_args")
    if not isinstance(value, Mapping):
        return {}
    args: dict[str, str] = {}
    for key, item in sorted(value.items(), key=lambda kv: kv[0] != OWN_ID):
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            dropped.append(f"unique_args.{key}")
        else:
            args[str(key)] = str(item)
    return args


@dataclass
class _Rewrite:
    """What one profile makes of an X-SMTPAPI value: the header lines, what went where."""

    existing: frozenset[str]  # header names the message already has (lower case)
    lines: list[str]
    translated: list[str]
    dropped: list[str]

    def add(self, name: str, value: str) -> bool:
        """Adds `name: value` unless the message already has its own `name` header."""
        if name.lower() in self.existing:
            return False
        self.lines.append(f"{name}: {fold_header_value(name, value)}\r\n")
        return True


def _ses(api: Mapping[str, Any], out: _Rewrite, configuration_set: str | None) -> None:
    tags: dict[str, str] = {}
    args = _unique_args(api, out.dropped)
    if OWN_ID in args:  # first: the one tag that matches SES's events back to the message
        tags[OWN_ID] = args.pop(OWN_ID)
    for i, category in enumerate(_categories(api)):
        name = "category" if i == 0 else f"category_{i + 1}"
        if SES_TAG_TEXT.fullmatch(category) and name not in tags:
            tags[name] = category
        else:
            out.dropped.append(f"category {category[:40]!r}")
    for key, value in args.items():
        if SES_TAG_TEXT.fullmatch(key) and SES_TAG_TEXT.fullmatch(value) and key not in tags:
            tags[key] = value
        else:
            out.dropped.append(f"unique_args.{key[:40]}")
    if tags:
        value = ", ".join(f"{k}={v}" for k, v in tags.items())
        if out.add(SES_TAGS, value):
            out.translated.append(f"{len(tags)} tags as {SES_TAGS}")
        else:
            out.dropped.append(f"{len(tags)} tags (the message has its own {SES_TAGS})")
    if configuration_set is not None:
        out.add(SES_CONFIGURATION_SET, check_configuration_set(configuration_set))


def _postmark(api: Mapping[str, Any], out: _Rewrite) -> None:
    categories = _categories(api)
    if categories:
        first, *rest = categories
        if PM_TAG_TEXT.fullmatch(first) and out.add(PM_TAG, first):
            out.translated.append(f"category as {PM_TAG}")
        else:
            out.dropped.append(f"category {first[:40]!r}")
        out.dropped += [f"category {c[:40]!r}" for c in rest]  # Postmark: one tag per message
    fields = 0
    for key, value in _unique_args(api, out.dropped).items():
        fits = PM_KEY.fullmatch(key) and PM_VALUE.fullmatch(value) and fields < PM_MAX_FIELDS
        if fits and out.add(PM_METADATA + key, value):
            fields += 1
        else:
            out.dropped.append(f"unique_args.{key[:40]}")
    if fields:
        out.translated.append(f"{fields} unique_args as {PM_METADATA}*")


def _note(profile: str, out: _Rewrite) -> str:
    text = f"X-SMTPAPI for relay profile {profile}:"
    if out.translated:
        text += f" {', '.join(out.translated)};"
    if not out.dropped:
        return f"{text} nothing dropped"
    text += " dropped"
    for i, name in enumerate(out.dropped):
        more = f" (+{len(out.dropped) - i} more)"
        if len(text) + 2 + len(name) + len(more) > MAX_NOTE:
            return text + more
        text += f"{',' if i else ''} {name}"
    return text


def adapt(
    data: str,
    profile: ProfileName,
    configuration_set: str | None = None,
    *,
    now: float | None = None,
) -> Adapted:
    """`data` (a rendered message) as a relay of `profile` should get it.

    sendgrid returns `data` itself without looking at it; another profile rewrites only the
    header block (X-SMTPAPI replaced by that relay's own headers, in its place) and the result
    passes `mailer.guard.check_wire`. Raises `Unportable` for a message only SendGrid can send
    right (`blockers`), ValueError for an unknown profile or a bad `configuration_set`."""
    if profile == "sendgrid":
        return Adapted(data)
    if profile not in PROFILE_NAMES:
        raise ValueError(f"unknown relay profile {profile!r}; one of {', '.join(PROFILE_NAMES)}")
    head_end = _header_end(data)
    head = data[:head_end]
    where = _locate(head)
    if where is None and (profile != "ses" or configuration_set is None):
        return Adapted(data)  # nothing to translate and nothing to add
    # The names of the headers the message has are needed only if one may clash with ours.
    prefix = _OWN_PREFIX.get(profile)
    clash = prefix is not None and prefix in f"\n{head.lower()}"
    existing = frozenset(n.lower() for n in _NAMES.findall(head)) if clash else frozenset()
    out = _Rewrite(existing, [], [], [])
    api: dict[str, Any] | None = {}
    if where is not None:
        api = _parse(head[where[0] : where[1]])
        if api is None:
            out.dropped.append("X-SMTPAPI (not a JSON object)")
        else:
            found = blockers(api, data[head_end:], now)
            if found:
                raise Unportable(profile, found)
    api = api or {}
    if profile == "ses":
        _ses(api, out, configuration_set)
    elif profile == "postmark":
        _postmark(api, out)
    translated = ("category", "unique_args") if profile != "smtp" else ()
    out.dropped += [f for f in FIELDS if f in api and f not in translated]
    out.dropped += sorted(f"X-SMTPAPI {k[:20]!r}" for k in api if k not in FIELDS)
    block = "".join(out.lines)  # each line ends with its CRLF
    if where is None:  # SES's configuration set alone: at the end of the header block
        new_head = f"{head}\r\n{block}"
    else:  # the field and its CRLF out, our lines in its place
        new_head = head[: where[0]] + block + head[where[1] + 2 :]
    new = new_head.removesuffix("\r\n") + data[head_end:]
    check_wire(new.encode("ascii"))
    note = "" if where is None else _note(profile, out)
    return Adapted(new, note, tuple(out.dropped))
