"""Every Redis key the project uses, in one place; docs/redis-keys.md says what each holds.

One style, `mailer:<area>:<name>`, so `SCAN mailer:*` finds all of ours and `mailer:<area>:*` one
area. Two Redis roles: the *state* Redis (MAILER_REDIS_URL: leases, ledger, dead letters,
circuit, throughput) and the *broker* (MAILER_BROKER_URL: kombu's queue and records, and the
fetch's consumer keys next to them). A name ending in a separator is a prefix; the functions
complete it. kombu's own keys are at the end, for the code that reads them.
"""

from __future__ import annotations

from mailer import wire
from mailer.lifecycle import RELAY_ID_PREFIX, STATUS_PREFIX

# -- state Redis ------------------------------------------------------------------------------

#: The lease semaphore's keys live under this prefix (`LeaseSemaphore(prefix=...)`).
LEASE_PREFIX = "mailer:sem:"
#: + message id: the message's ledger record (JSON); producers write `cancelled` there.
LEDGER_PREFIX = wire.LEDGER_PREFIX
DEAD_LETTERS = "mailer:dead:records"
DEAD_LETTER_INDEX = "mailer:dead:index"
CIRCUIT = "mailer:circuit"
CIRCUIT_PROBE = "mailer:circuit:probe"
#: A relay's trouble run (workers/state/trouble.py): when its first transient failure since its
#: last success happened; the failover router (workers/engine/failover.py) reads its age.
TROUBLE = "mailer:trouble"
#: Taken by the one message per probe interval that still goes to a failed-over relay.
TROUBLE_PROBE = "mailer:trouble:probe"
#: + minute since the epoch: outcome counts of that minute.
THROUGHPUT_PREFIX = "mailer:throughput:"
#: The fleet's message rate: window schedules, the adaptive ceiling, per-second counts (hash).
RATE = "mailer:rate"
#: The fleet's session-open rate (MAILER_CONNECT_RATE), same layout.
RATE_CONNECT = "mailer:rate:connect"

#: A message's status record (mailer/lifecycle.py names it: the app reads it); + message id.
STATUS = STATUS_PREFIX
#: + the relay's queue id ("250 Ok: queued as <id>"): our message id, for events without ours.
RELAY_ID = RELAY_ID_PREFIX
#: + sg_event_id: an event already applied (SendGrid retries and duplicates for 24 hours).
EVENT_SEEN_PREFIX = "mailer:events:seen:"
#: + minute since the epoch: event counts by type of that minute (`mailer status`).
EVENT_COUNTS_PREFIX = "mailer:events:count:"
#: Verified webhook batches waiting to be applied, and those being applied.
EVENT_INBOX = "mailer:events:inbox"
EVENT_PROCESSING = "mailer:events:processing"
#: The uncertain sweep's once-per-interval lock (one webhook process sweeps).
EVENT_SWEEP = "mailer:events:sweep"
#: The `default` relay's suppressed recipients: address -> JSON {reason, at, source,
#: message_id}. A named relay has its own lists (`suppress_global(relay)`: SendGrid keeps
#: suppressions per subuser, so one tenant's bounce must not stop another's mail).
SUPPRESS_GLOBAL = "mailer:suppress:global"
#: + asm_group_id: the recipients who left that unsubscribe group (the `default` relay's).
SUPPRESS_GROUP_PREFIX = "mailer:suppress:group:"

#: The named relays (mailer/relays.py): name -> JSON spec (never a secret), and a counter
#: bumped on every change (workers and producers re-read the hash when it moves).
RELAYS = wire.RELAYS
RELAYS_VERSION = wire.RELAYS_VERSION
#: + relay name + ":" + what: a named relay's own circuit, rate, trouble run (the `default`
#: relay keeps the historical unscoped keys: CIRCUIT, RATE, ...).
RELAY_PREFIX = "mailer:relay:"

# -- broker Redis -----------------------------------------------------------------------------

#: The durable schedule: id -> due time (ZSET), id -> "<queue>\n<message>" (HASH).
SCHEDULE_DUE = wire.SCHEDULE_DUE
SCHEDULE_ITEMS = wire.SCHEDULE_ITEMS

FETCH_CONSUMERS = "mailer:fetch:consumers"
FETCH_QUEUES = "mailer:fetch:queues"
#: + consumer id: what that consumer moved off the queue and has not recorded yet.
FETCH_INFLIGHT_PREFIX = "mailer:fetch:inflight:"

#: kombu's Redis transport: delivery tag -> message, and delivery tag -> delivery time.
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"
#: kombu's separator between a queue's name and its priority level ("mailer\x06\x163").
KOMBU_PRIORITY_SEP = "\x06\x16"


def for_relay(relay: str, key: str) -> str:
    """`key` (CIRCUIT, CIRCUIT_PROBE, RATE, RATE_CONNECT, ...) as relay `relay`'s own: the
    `default` relay keeps the unscoped key, so a rolling upgrade shares one state."""
    if relay == wire.DEFAULT_RELAY:
        return key
    return f"{RELAY_PREFIX}{relay}:{key.removeprefix('mailer:')}"


def ledger(message_id: str) -> str:
    return LEDGER_PREFIX + message_id


def status(message_id: str) -> str:
    return STATUS_PREFIX + message_id


def relay_id(queue_id: str) -> str:
    return RELAY_ID_PREFIX + queue_id


def event_seen(sg_event_id: str) -> str:
    return EVENT_SEEN_PREFIX + sg_event_id


def event_counts(minute: int) -> str:
    return f"{EVENT_COUNTS_PREFIX}{minute}"


def suppress_global(relay: str = wire.DEFAULT_RELAY) -> str:
    """Relay `relay`'s global suppression list."""
    return for_relay(relay, SUPPRESS_GLOBAL)


def suppress_group(group: int | str, relay: str = wire.DEFAULT_RELAY) -> str:
    """Relay `relay`'s list of unsubscribe group `group` (its prefix when `group` is "")."""
    return for_relay(relay, f"{SUPPRESS_GROUP_PREFIX}{group}")


def throughput(minute: int) -> str:
    return f"{THROUGHPUT_PREFIX}{minute}"


def inflight(consumer_id: str) -> str:
    return FETCH_INFLIGHT_PREFIX + consumer_id


def lease_holders(limit: str, prefix: str = LEASE_PREFIX) -> str:
    return f"{prefix}{limit}:holders"


def lease_meta(limit: str, prefix: str = LEASE_PREFIX) -> str:
    return f"{prefix}{limit}:meta"


def lease_wanted(limit: str, prefix: str = LEASE_PREFIX) -> str:
    return f"{prefix}{limit}:wanted"


def lease_epoch(prefix: str = LEASE_PREFIX) -> str:
    return f"{prefix}epoch"


def lease_quarantine(prefix: str = LEASE_PREFIX) -> str:
    return f"{prefix}quarantine"


def lease_waiting(prefix: str = LEASE_PREFIX) -> str:
    return f"{prefix}waiting"


def lease_released(prefix: str = LEASE_PREFIX) -> str:
    """The pub/sub channel of release notices (a channel, not a key)."""
    return f"{prefix}released"
