"""kombu's private parts (5.7.x) that the workers' fetch (workers/broker.py), the consumer's
streaming (workers/strategy.py) and the producer (mailer/publish.py) rely on.

The workers reach them through the accessors below; what cannot go through an accessor (methods
our subclasses override, attributes kombu's own loop reads back) and what mailer/publish.py uses
(the producer imports nothing from `workers`) is listed in `PRIVATE` all the same.
tests/unit/test_private_api.py checks every entry.
"""

from __future__ import annotations

from typing import Any

from kombu.message import Message
from kombu.transport import redis as kredis
from kombu.transport import virtual

from workers.compat import Private

__all__ = ["PRIVATE", "deliver", "mark_acked", "set_decoded"]

Channel = kredis.Channel
QoS = kredis.QoS

PRIVATE: tuple[Private, ...] = (
    # workers/broker.py: the atomic fetch, a subclass of kombu's Redis channel and QoS.
    Private(Channel, "_brpop_start", "overridden: BLMOVE instead of BRPOP", ("timeout",)),
    Private(Channel, "_brpop_read", "overridden: reads the BLMOVE reply", ("options",)),
    Private(Channel, "_in_poll", "set while our BLMOVE is in flight, as kombu's poller expects"),
    Private(Channel, "_brpop_sent_at", "set when our BLMOVE leaves, as kombu's BRPOP does"),
    Private(Channel, "_flush_brpop_reauth", "called after a read, as kombu's `_brpop_read` does"),
    Private(Channel, "_q_for_pri", "the Redis key of a queue", ("queue", "pri")),
    Private(Channel, "from_transport_options", "extended with `inflight_dead_after`"),
    Private(kredis, "Empty", "what a fetch that found nothing raises (kombu's `queue.Empty`)"),
    Private(virtual.Transport, "_deliver", "hands a fetched message on", ("message", "queue")),
    Private(QoS, "append", "overridden: recorded atomically", ("message", "delivery_tag")),
    Private(QoS, "can_consume_max_estimate", "bounds how many a fetch takes"),
    Private(QoS, "pipe_or_acquire", "the MULTI/EXEC of our records and acks", ("pipe", "client")),
    Private(QoS, "restore_visible", "overridden: heartbeat, sweep", ("start", "num", "interval")),
    Private(virtual.QoS, "append", "called past kombu's Redis record", ("message", "delivery_tag")),
    Private(virtual.QoS, "ack", "called past kombu's Redis ack (`ack_many`)", ("delivery_tag",)),
    # workers/strategy.py: first attempts decoded and acknowledged outside Celery's Request.
    Private(Message, "_decoded_cache", "the body we decoded, as `Message.decode()` keeps it"),
    Private(Message, "_state", "'ACK' once acknowledged in a group, as `Message.ack` records"),
    # mailer/publish.py: ReusedClient (producer and workers) and RedisPublisher (producer).
    Private(Channel, "conn_or_acquire", "overridden: one client per channel", ("client",)),
    Private(Channel, "_pool", "None once kombu closed the connection"),
    Private(Channel, "_create_client", "builds the channel's one client"),
    Private(Channel, "_get_publish_topic", "the event topic", ("exchange", "routing_key")),
    Private(Channel, "_connparams", "RedisPublisher's pool takes kombu's connection settings"),
)


def deliver(channel: Any, message: Any, queue: str) -> None:
    """Hands a message fetched by our own commands to the consumer, as kombu's fetch does."""
    channel.connection._deliver(message, queue)


def set_decoded(message: Message, body: Any) -> Any:
    """Keeps `body` as the message's decoded body (what `decode()` returns from then on)."""
    message._decoded_cache = body
    return body


def mark_acked(message: Message) -> None:
    """Records an acknowledgement made for many messages at once (`QoS.ack_many`)."""
    message._state = "ACK"
