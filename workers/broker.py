"""The broker transport the workers consume with: kombu's Redis transport without its loss window.

kombu takes a message off the queue with BRPOP and only afterwards records it as unacknowledged
(`QoS.append`: ZADD + HSET). A worker killed in between, or whose BRPOP reply is still unread in
its socket, loses the message for good (docs/fetch.md). Here the message is moved atomically
(BLMOVE) onto a list owned by this consumer and leaves that list in the same MULTI/EXEC that
records it in `unacked`. So at every instant a message is in the queue, in one consumer's
in-flight list, or in `unacked` (which kombu restores after the visibility timeout).

Consumers heartbeat (Redis `TIME`, no clock skew) in a sorted set before fetching and on kombu's
restore timer (which keeps running while fetching is paused because every slot is busy). The sweep
each worker already runs for `unacked` also pushes back onto its queue whatever a consumer that
stopped heartbeating for `inflight_dead_after` seconds left on its list; a closing channel puts
its own leftovers back at once (a warm shutdown with a fetched-but-unread reply loses nothing), and
so does a channel whose BLMOVE reply was lost with its connection (a broker restart), before it
fetches again.

A worker serving several lanes consumes their queues in priority order: each fetch takes from
the highest queue that holds a message (atomically onto the in-flight list, `_MOVE_FIRST`), and
only when all were empty does it block, on the highest, for at most LOWER_LANE_WAIT seconds.
It applies to queues with one priority step and no global key prefix (what `mailer worker`
sets up); anything else falls back to kombu's own fetch.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from kombu.transport import redis as kredis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps
from kombu.utils.json import loads as kombu_loads

from mailer.publish import ReusedClient
from mailer.wire import BATCH_TASK
from workers.compat.kombu import deliver
from workers.state import keys, scripts

HEARTBEAT_EVERY = 2.0  # seconds between heartbeats of a consumer that keeps fetching
DEAD_AFTER = 60.0  # default `inflight_dead_after`: far above a fetch cycle, even under load
SWEEP_LIMIT = 100  # dead consumers handled per sweep

# The scripts (workers/state/lua/fetch_*.lua; KEYS and ARGV in their headers).
_BEAT = scripts.source("fetch_lib", "fetch_beat")
_SWEEP = scripts.source("fetch_lib", "fetch_sweep")
_TAKE = scripts.source("fetch_take")
_MOVE_FIRST = scripts.source("fetch_move_first")
#: A consumer of several lanes that found them all empty blocks on the highest one for at most
#: this long before it looks at all of them again: what a lower lane's message may wait on an
#: idle worker.
LOWER_LANE_WAIT = 1.0

#: The most messages one fetch takes beyond the first (the prefetch limit bounds it too).
TAKE_MAX = 32


#: Set by the worker: how many more messages the process wants (None: no limit). At 0 fetching
#: pauses and the queue stays with the other workers; the prefetch limit alone counts tasks,
#: and a batch task is a hundred messages.
room: Callable[[], int | None] | None = None
#: Set by the worker when it serves several lanes: room for more messages of the highest lane
#: alone. When `room` is spent on lower lanes, fetching goes on from the highest queue only,
#: so a transactional message never waits for a bulk backlog held in this process.
top_room: Callable[[], int] | None = None
#: After a fetch from the highest queue alone found it empty: when to look again.
TOP_POLL = 0.05


#: After a fetch that brought fewer than LINGER_BELOW messages, the next waits LINGER
#: seconds: a producer sending one message at a time otherwise costs a worker two round trips,
#: a dispatch and an ack per message, where a short wait lets a few accumulate for one `_TAKE`.
#: A queue with a backlog never waits (each fetch brings many). 20 ms gave the best rate of
#: the values tried (bench/README.md); a message waits at most that long, nothing for e-mail.
LINGER = 0.02
LINGER_BELOW = 8


def loads(text: str | bytes) -> Any:
    """kombu's JSON `loads`, without its per-object hook when the text has nothing for it.

    The hook turns `{"__type__": ..., "__value__": ...}` objects (kombu's encoder writes them
    for datetimes, UUIDs, bytes...) back into values, at the price of a Python call for every
    JSON object decoded; a task envelope or a `mailer.send` body holds none, and the C
    decoder alone is much cheaper. Text that names `"__type__"` anywhere goes to kombu."""
    tagged = b'"__type__"' in text if isinstance(text, bytes) else '"__type__"' in text
    return kombu_loads(text) if tagged else json.loads(text)


class QoS(kredis.QoS):
    def can_consume(self) -> bool:
        """kombu's prefetch limit and our room; once either is spent, the highest lane alone
        (its own room): Celery's prefetch counts tasks, and a process holding its count of
        bulk batch tasks must still take the next transactional message, not after a batch
        ends (0.7 s at the median here, bench/README.md)."""
        channel: Channel = self.channel
        if time.monotonic() < channel.linger_until:
            return False
        wanted = room() if room is not None else None
        channel.top_only = not super().can_consume() or (wanted is not None and wanted <= 0)
        return not channel.top_only or (top_room is not None and top_room() > 0)

    def append(self, message: Any, delivery_tag: str) -> None:
        """Records the message in `unacked` and takes it off our in-flight list atomically."""
        channel: Channel = self.channel
        if channel.taken:  # recorded by `_TAKE` already
            virtual.QoS.append(self, message, delivery_tag)
            return
        staged, channel.staged = channel.staged, None
        if staged is None:
            super().append(message, delivery_tag)
            return
        delivery = message.delivery_info
        # kombu's record, `dumps([payload, exchange, routing_key])`, with the payload as it was
        # fetched rather than encoded again (a batch's JSON is large).
        raw = "[{},{},{}]".format(
            bytes_to_str(staged), dumps(delivery["exchange"]), dumps(delivery["routing_key"])
        )
        with self.pipe_or_acquire() as pipe:  # MULTI/EXEC
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            pipe.hset(self.unacked_key, delivery_tag, raw)
            pipe.lrem(channel.inflight_key, 1, staged)
            pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)

    def ack_many(self, delivery_tags: list[str]) -> None:
        """`ack` for many messages in one round trip (workers/strategy.py settles in groups):
        one ZREM and one HDEL naming them all, not two commands each (which redis-py packed and
        parsed one by one: a large share of the settle thread's time)."""
        if not delivery_tags:
            return
        with self.pipe_or_acquire() as pipe:  # MULTI/EXEC
            pipe.zrem(self.unacked_index_key, *delivery_tags)
            pipe.hdel(self.unacked_key, *delivery_tags)
            pipe.execute()
        for tag in delivery_tags:
            virtual.QoS.ack(self, tag)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        """On kombu's restore timer, which runs even while fetching is paused (every slot
        busy, a fetched reply left unread): a heartbeat, then both sweeps."""
        channel: Channel = self.channel
        channel.heartbeat()
        super().restore_visible(start, num, interval)
        channel.sweep()


class Channel(ReusedClient, kredis.Channel):
    """kombu's Redis channel with the fetch above, and one Redis client for its publishes
    (task events), acks and fetch records (see `ReusedClient`)."""

    QoS = QoS
    inflight_dead_after = DEAD_AFTER
    queue_order: tuple[str, ...] | list[str] = ()  # the lanes' queues, highest priority first
    from_transport_options = (  # type: ignore[assignment]  # kombu types it as a fixed tuple
        *kredis.Channel.from_transport_options,
        "inflight_dead_after",
        "queue_order",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.consumer_id = uuid.uuid4().hex
        self.inflight_key = keys.inflight(self.consumer_id)
        self.staged: bytes | None = None  # fetched by us, not yet recorded in `unacked`
        self.taken = False  # delivering a message `_TAKE` recorded
        self.linger_until = 0.0  # monotonic time before which no fetch starts (see LINGER)
        self._take: Any = None  # the registered `_TAKE` script, per client
        self._moving: list[str] | None = None  # the queues of the BLMOVE/_MOVE_FIRST in flight
        self._blocking = False  # the command in flight is a BLMOVE (else _MOVE_FIRST)
        self._all_empty = False  # the last _MOVE_FIRST found every queue empty
        self.top_only = False  # the room is spent: the next fetch may take the highest lane only
        self._top_fetch = False  # the fetch in flight takes from the highest lane only
        self._unread = False  # a BLMOVE was sent and its reply never read (connection lost)
        self._beat_at = 0.0
        self._beat_queue = ""

    def _movable_queues(self) -> list[str] | None:
        """The queue keys our fetch serves, highest priority first (the lanes' order), or None:
        kombu's own fetch then."""
        queues = list(self.active_queues)
        if self.global_keyprefix or not queues:
            return None
        for queue in queues:
            if {self._q_for_pri(queue, pri) for pri in self.priority_steps} != {queue}:
                return None
        order = {name: index for index, name in enumerate(self.queue_order)}
        return sorted(queues, key=lambda q: (order.get(q, len(order)), q))

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._movable_queues()
        self._top_fetch = queues is not None and self.top_only and len(queues) > 1
        if queues is not None and self._top_fetch:
            queues = queues[:1]  # room for the highest lane alone: never block on it
        self._moving = queues
        if queues is None:
            super()._brpop_start(timeout)
            return
        self._heartbeat(queues[0])
        if self._unread:
            # The last command's reply was lost with its connection: whatever it moved is on
            # our list and nobody will deliver it. Nothing else can be there now.
            self.sweep(own=True)
            self._unread = False
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]  # kombu: None
        wait = self.brpop_timeout if timeout is None else timeout
        self._unread = True
        # One queue: block on it. Several: take from the first that holds a message, and only
        # once all were found empty block on the highest (LOWER_LANE_WAIT at most).
        self._blocking = not self._top_fetch and (len(queues) == 1 or self._all_empty)
        if self._blocking:
            if len(queues) > 1:
                wait = min(wait or LOWER_LANE_WAIT, LOWER_LANE_WAIT)
            self.client.connection.send_command(
                "BLMOVE", queues[0], self.inflight_key, "RIGHT", "LEFT", wait or 0
            )
        else:
            keys = [self.inflight_key, *queues]
            self.client.connection.send_command("EVAL", _MOVE_FIRST, len(keys), *keys)

    def _brpop_read(self, **options: Any) -> bool:
        queues, self._moving = self._moving, None
        if queues is None:
            return bool(super()._brpop_read(**options))
        try:
            try:
                command = "BLMOVE" if self._blocking else "EVAL"
                item = self.client.parse_response(self.client.connection, command, **options)
                self._unread = False
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            queue = queues[0]
            if self._blocking:
                self._all_empty = False
            elif self._top_fetch:
                if item is None:  # nothing of the highest lane: look again shortly
                    self._linger(TOP_POLL)
                else:
                    queue, item = bytes_to_str(item[0]), item[1]
            else:
                self._all_empty = item is None
                if item is not None:
                    queue, item = bytes_to_str(item[0]), item[1]
            if item is None:
                raise kredis.Empty()
            self._deliver_moved(queue, item, queues)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu's own code does the same
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _deliver_moved(self, queue: str, item: bytes, queues: list[str]) -> None:
        self.staged = item
        message = loads(bytes_to_str(item))
        try:
            deliver(self, message, queue)
        except BaseException:
            if self.staged is not None:  # never recorded: straight back onto the queue
                self._return(queue, item)
            raise
        finally:
            staged, self.staged = self.staged, None
        if staged is not None:  # kombu took it without recording it (no ack expected)
            with self.conn_or_acquire() as client:
                client.lrem(self.inflight_key, 1, staged)  # type: ignore[arg-type]  # exact bytes
        batch = (message.get("headers") or {}).get("task") == BATCH_TASK  # one at a time
        if not batch and 1 + self._take_more(queues) < LINGER_BELOW:
            self._linger()

    def _linger(self, seconds: float = LINGER) -> None:
        hub = getattr(self.connection, "hub", None)
        if hub is None:  # not in an event loop (a plain drain_events): nothing to wake us
            return
        self.linger_until = time.monotonic() + seconds
        hub.call_later(seconds, _nothing)  # the poll wakes when the wait is over

    def _take_more(self, queues: list[str]) -> int:
        """After a move: whatever else the queues hold (highest first), up to the prefetch
        room, in the same poll (one round trip for many messages instead of two per message);
        how many."""
        n = TAKE_MAX
        limits: tuple[int | None, ...] = (
            self.qos.can_consume_max_estimate(),
            room() if room is not None else None,
        )
        if self._top_fetch and top_room is not None:
            limits = (top_room(),)  # the highest lane's own room (see `QoS.can_consume`)
        for limit in limits:
            n = n if limit is None else min(n, limit)
        if n <= 0:
            return 0
        with self.conn_or_acquire() as client:
            if self._take is None or self._take.registered_client is not client:
                self._take = client.register_script(_TAKE)
            reply = self._take(
                keys=[self.unacked_index_key, self.unacked_key, *queues], args=[n, time.time()]
            )
        taken = [(bytes_to_str(reply[i]), reply[i + 1]) for i in range(0, len(reply), 2)]
        for index, (queue, item) in enumerate(taken):
            self.taken = True
            try:
                deliver(self, loads(bytes_to_str(item)), queue)
            except BaseException:
                self._give_back(taken[index + 1 :])
                raise
            finally:
                self.taken = False
        return len(taken)

    def _give_back(self, taken: list[tuple[str, bytes]]) -> None:
        """Taken and recorded but never delivered (a delivery before them failed): back on
        their queues now, rather than after the visibility timeout."""
        if not taken:
            return
        with self.conn_or_acquire() as client:
            pipe = client.pipeline()
            for queue, item in reversed(taken):
                tag = loads(bytes_to_str(item))["properties"]["delivery_tag"]
                pipe.zrem(self.unacked_index_key, tag)
                pipe.hdel(self.unacked_key, tag)
                pipe.rpush(queue, item)
            pipe.execute()

    def _return(self, queue: str, item: bytes) -> None:
        self.staged = None
        with self.conn_or_acquire() as client:
            pipe = client.pipeline()
            pipe.lrem(self.inflight_key, 1, item)  # type: ignore[arg-type]  # exact bytes
            pipe.rpush(queue, item)
            pipe.execute()

    def heartbeat(self) -> None:
        if self._beat_queue:
            self._beat_at = 0.0
            self._heartbeat(self._beat_queue)

    def _heartbeat(self, queue: str) -> None:
        now = time.monotonic()
        if queue == self._beat_queue and now - self._beat_at < HEARTBEAT_EVERY:
            return
        with self.conn_or_acquire() as client:
            client.eval(_BEAT, 2, keys.FETCH_CONSUMERS, keys.FETCH_QUEUES, self.consumer_id, queue)
        self._beat_at, self._beat_queue = now, queue

    def sweep(self, own: bool = False) -> int:
        """Puts back what dead consumers (or, with `own`, this one) fetched and never
        recorded; returns how many messages went back onto their queues."""
        with self.conn_or_acquire() as client:
            restored = client.eval(
                _SWEEP,
                3,
                keys.FETCH_CONSUMERS,
                keys.FETCH_QUEUES,
                self.unacked_key,
                keys.FETCH_INFLIGHT_PREFIX,
                self.inflight_dead_after,
                SWEEP_LIMIT,
                self.consumer_id if own else "",
            )
        return int(restored or 0)

    def close(self) -> None:
        if self._beat_queue and not self.closed:
            # On a connection error we stay registered: another worker's sweep returns them.
            with contextlib.suppress(*self.connection_errors):
                self.sweep(own=True)
        super().close()


class Transport(kredis.Transport):
    Channel = Channel
    hub: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self.hub = loop
        super().register_with_event_loop(connection, loop)


class SentinelChannel(Channel, kredis.SentinelChannel):
    """The fetch above on the primary kombu's Sentinel channel finds (and finds again after a
    failover): its connections are redis-py's sentinel-managed ones, the commands the same."""

    from_transport_options = (  # type: ignore[assignment]
        *Channel.from_transport_options,
        *(
            o
            for o in kredis.SentinelChannel.from_transport_options
            if o not in Channel.from_transport_options
        ),
    )


class SentinelTransport(Transport):
    """kombu's Sentinel transport (`sentinel://` URLs) with the loss-free fetch."""

    Channel = SentinelChannel
    default_port = kredis.SentinelTransport.default_port  # type: ignore[assignment]


def _nothing() -> None:
    pass
