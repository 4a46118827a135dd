"""The private parts of Celery, kombu, aiosmtplib and asyncio our code relies on, checked
against the installed releases (workers/compat/ lists them, one module per library).

An upgrade that renames, removes or changes one of them fails here, naming it, before any
worker runs on it; the pyproject.toml upper bounds keep such an upgrade from arriving unasked.
"""

from __future__ import annotations

import inspect
import re

import pytest

from workers.compat import Private
from workers.compat import celery as celery_compat
from workers.compat import kombu as kombu_compat
from workers.engine import loop, protocol

LISTS = {
    "celery": celery_compat.PRIVATE,
    "kombu": kombu_compat.PRIVATE,
    "aiosmtplib": protocol.PRIVATE,
    "asyncio": loop.PRIVATE,
}
ENTRIES = [(library, entry) for library, entries in LISTS.items() for entry in entries]


def where(entry: Private) -> str:
    owner = entry.owner
    return f"{getattr(owner, '__module__', owner.__name__)}.{owner.__name__}.{entry.name}"


def assigned_on_instances(owner: type, name: str) -> bool:
    """Whether some method of `owner` (or a base class) sets `self.<name>`."""
    pattern = re.compile(rf"\bself\.{re.escape(name)}\s*(?::[^=\n]+)?=(?!=)")
    for cls in inspect.getmro(owner):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):  # a builtin base such as `object`
            continue
        if pattern.search(source):
            return True
    return False


@pytest.mark.parametrize(
    ("library", "entry"), ENTRIES, ids=[f"{lib}:{where(e)}" for lib, e in ENTRIES]
)
def test_each_private_part_we_rely_on_is_still_there(library: str, entry: Private) -> None:
    if entry.instance:
        assert assigned_on_instances(entry.owner, entry.name), (
            f"{library} changed: {where(entry)} is no longer set on instances ({entry.why})"
        )
    else:
        assert hasattr(entry.owner, entry.name), (
            f"{library} changed: {where(entry)} is gone ({entry.why})"
        )
    if entry.params:
        found = inspect.signature(getattr(entry.owner, entry.name)).parameters
        missing = [p for p in entry.params if p not in found]
        assert not missing, (
            f"{library} changed: {where(entry)} no longer takes {missing} ({entry.why}); "
            f"it takes {list(found)}"
        )


def test_every_entry_says_why() -> None:
    for library, entry in ENTRIES:
        assert entry.why.strip(), f"{library}: {where(entry)} has no reason"


def test_the_check_fails_loudly_on_a_missing_attribute() -> None:
    """The check itself: a name the library does not have fails, naming it."""
    gone = Private(kombu_compat.Channel, "_no_such_thing", "a test")
    with pytest.raises(AssertionError, match=r"kombu\.transport\.redis\.Channel\._no_such_thing"):
        test_each_private_part_we_rely_on_is_still_there("kombu", gone)
    renamed = Private(kombu_compat.Channel, "_q_for_pri", "a test", ("queue", "priority"))
    with pytest.raises(AssertionError, match=r"no longer takes \['priority'\]"):
        test_each_private_part_we_rely_on_is_still_there("kombu", renamed)
    unset = Private(kombu_compat.Channel, "_never_set", "a test", instance=True)
    with pytest.raises(AssertionError, match="no longer set on instances"):
        test_each_private_part_we_rely_on_is_still_there("kombu", unset)


def test_the_accessors_do_what_kombu_and_celery_do() -> None:
    """`set_decoded` and `mark_acked` leave a message as kombu's `decode()` and `ack()` would;
    `flush_events` is the consumer's own flush; the names are Celery's."""
    from celery.worker.consumer.consumer import Consumer
    from kombu.message import Message

    message = Message(body=b'[[{"id": 1}], {}, {}]', content_type="application/json")
    body = kombu_compat.set_decoded(message, [[{"id": 1}], {}, {}])
    assert message.decode() is body and message.payload is body
    assert not message.acknowledged
    kombu_compat.mark_acked(message)
    assert message.acknowledged and message._state == "ACK"

    class Stub:
        _flush_events = Consumer._flush_events

    stub = Stub()
    assert celery_compat.flush_events(stub).__func__ is Consumer._flush_events
    assert celery_compat.TASKS_STEP == "celery.worker.consumer.tasks:Tasks"
    assert celery_compat.IN_PROCESS_POOLS == (
        "celery.concurrency.thread",
        "celery.concurrency.solo",
    )
    assert celery_compat.TASK_LOGGERS == ("celery.worker.strategy", "celery.app.trace")
