"""Every event in PostgreSQL (MAILER_EVENTS_DSN), for history and analytics: one row per
`sg_event_id`, written per drained batch with one multi-row statement, a replay ignored
(ON CONFLICT DO NOTHING). The table is created at start-up if missing."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg

log = logging.getLogger("mailer.events")

TABLE = "mailer_events"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    sg_event_id  text PRIMARY KEY,
    message_id   text,
    event        text NOT NULL,
    email        text,
    occurred_at  timestamptz,
    received_at  timestamptz NOT NULL DEFAULT now(),
    data         jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS {TABLE}_message_id ON {TABLE} (message_id);
CREATE INDEX IF NOT EXISTS {TABLE}_occurred_at ON {TABLE} (occurred_at);
"""
INSERT = (
    f"INSERT INTO {TABLE} (sg_event_id, message_id, event, email, occurred_at, data) "
    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (sg_event_id) DO NOTHING"
)


class EventStore:
    """One connection, used by the drain thread only."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=False)
            with self._conn.cursor() as cur:
                cur.execute(SCHEMA)
            self._conn.commit()
        return self._conn

    def start(self) -> EventStore:
        """Connects and creates the schema: a wrong DSN fails the process at start-up."""
        self._connection()
        return self

    def write(self, rows: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        """(event id, message id or "", the event) per row, in one transaction."""
        if not rows:
            return
        values = []
        for ident, mid, event in rows:
            at = event.get("timestamp")
            when = datetime.fromtimestamp(at, UTC) if isinstance(at, int | float) else None
            values.append(
                (
                    ident,
                    mid or None,
                    str(event.get("event", "")),
                    str(event.get("email", "")) or None,
                    when,
                    json.dumps(event),
                )
            )
        conn = self._connection()
        try:
            with conn.cursor() as cur:
                cur.executemany(INSERT, values)
            conn.commit()
        except psycopg.Error:
            conn.rollback()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
