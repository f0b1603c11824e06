"""Analytics kernel: store each event once in PostgreSQL, and count events per type and minute, exactly once.

Input: a JSON object with "type" and "user" (non-empty strings) and "ts", when it happened (an
ISO-8601 time, UTC unless it says otherwise, or milliseconds since the epoch). It is a process_batch
kernel, and each batch (one partition's events, in offset order) is written in one transaction: the
events are copied (COPY) into a temporary table, then inserted from it into ANALYTICS_EVENTS_TABLE
(default "analytics_events") under their message_id(), skipping those stored already; and the counts
per type and minute in ANALYTICS_ROLLUPS_TABLE (default "analytics_rollups") grow by the events just
inserted, and only by them. So a batch delivered again after a crash or a rebalance, whole or in part, changes neither
table: exactly-once effects, on at-least-once delivery; and new events at offsets used before (the
topic created again, a local broker started over) are stored and counted like any others. The tables
are created if missing, in DATABASE_URL (default postgresql://127.0.0.1:5432/test).

A malformed event is dead-lettered with the reason (the events before it in its batch are stored
first; those after it come in the next batch). While PostgreSQL is unreachable the batch is retried
(False); a DATABASE_URL that can never connect (malformed, or sslmode=bogus) stops the kernel (exit
1) with a line naming it, without its password. An event PostgreSQL refuses is found by storing the
batch's events one at a time, and dead-lettered. /metrics (with KERNEL_HTTP_PORT) counts the events
stored, and the redelivered ones skipped, per topic. Needs `uv sync --extra database`.

    uv run --extra database python -m examples.analytics
"""

import datetime
import logging
import os
import threading

import psycopg
from prometheus_client import Counter
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from main import DeadLetter, batch_coordinates, json_object, message_id, setting  # adopting: drop this line

KERNEL_NAME = "analytics-kernel"
DEFAULT_TOPIC = "events"
MAX_VALUE_BYTES = 64 * 1024  # an event larger than this is not one of ours: dead-lettered
REQUIRED_FIELDS = ("type", "user")
CONNECT_TIMEOUT_S = 5  # how long one attempt waits for a connection before the batch is retried
LOCK_TIMEOUT_MS = 30_000  # how long a batch waits for events another transaction is inserting before it is retried

log = logging.getLogger(KERNEL_NAME)
# Served on /metrics beside the kernel's own, labelled by the consumed topic as the kernel's are.
EVENTS_STORED = Counter("analytics_events_stored", "Events stored and counted, the first time they came", ["topic"])
REDELIVERIES_SKIPPED = Counter("analytics_redeliveries_skipped", "Events that came again, stored already: skipped",
                               ["topic"])


def process_batch(messages) -> bool:
    rows, malformed = event_rows(messages)
    try:
        try:
            stored = warehouse().store(rows)
        except psycopg.DataError:  # PostgreSQL refuses one of them: store them one by one to find it
            stored = store_until_refused(messages, rows)
    except (psycopg.OperationalError, PoolTimeout) as error:  # the database is down, overloaded or locked
        log.warning("PostgreSQL unavailable (%s); %s will be retried", first_line(error), batch_coordinates(messages))
        return False
    log.debug("Stored %d new event(s) of %s%s", stored, batch_coordinates(messages[:len(rows)] or messages),
              "" if stored == len(rows) else f"; {len(rows) - stored} were there already: a redelivery")
    if malformed is not None:
        raise malformed  # the events before it are stored; it is dead-lettered, those after it come again
    return True


def event_rows(messages) -> tuple[list[tuple], DeadLetter | None]:
    """The rows of the events up to the first malformed one, and a DeadLetter naming that one."""
    rows = []
    for message in messages:
        try:
            rows.append(event_row(message))
        except DeadLetter as rejection:
            return rows, DeadLetter(str(rejection), message=message)
    return rows, None


def event_row(message) -> tuple:
    event = json_object(message, MAX_VALUE_BYTES, REQUIRED_FIELDS)  # or DeadLetter saying why
    if b"\\u0000" in message.value:
        raise DeadLetter("the value holds a NUL character, which PostgreSQL cannot store")
    try:  # JSON can spell a lone surrogate (\ud800), which no text column can hold
        (event["type"] + event["user"]).encode()
    except UnicodeEncodeError:
        raise DeadLetter('field "type" or "user" is not valid Unicode text (a lone surrogate)') from None
    return (message_id(message), message.topic, message.partition, message.offset, event["type"], event["user"],
            event_time(event), message.value.decode())


def event_time(event: dict) -> datetime.datetime:
    """The event's "ts": an ISO-8601 time (UTC if it names no zone) or milliseconds since the epoch."""
    ts = event.get("ts")
    try:
        if isinstance(ts, int | float) and not isinstance(ts, bool):
            return datetime.datetime.fromtimestamp(ts / 1000, datetime.UTC)
        if isinstance(ts, str):
            moment = datetime.datetime.fromisoformat(ts)
            return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)
    except (ValueError, OverflowError, OSError):
        pass
    raise DeadLetter(f'field "ts" must be an ISO-8601 time or milliseconds since the epoch, got {ts!r:.80}')


def store_until_refused(messages, rows: list[tuple]) -> int:
    """Store the rows one at a time (each is idempotent); DeadLetter for the first PostgreSQL refuses."""
    stored = 0
    for message, row in zip(messages, rows, strict=False):
        try:
            stored += warehouse().store([row])
        except psycopg.DataError as refused:
            raise DeadLetter(f"PostgreSQL refused it: {first_line(refused)}", message=message) from None
    return stored


def read_settings() -> dict:
    """This kernel's own settings. The kernel reads them at start-up and in `python main.py check`, so a
    malformed DATABASE_URL stops it (exit code 2) before the first message."""
    return {"database_url": setting("DATABASE_URL", "postgresql://127.0.0.1:5432/test", parse=postgresql_url,
                                    secret=True),
            "events_table": setting("ANALYTICS_EVENTS_TABLE", "analytics_events"),
            "rollups_table": setting("ANALYTICS_ROLLUPS_TABLE", "analytics_rollups")}


def postgresql_url(url: str) -> str:
    """A URL psycopg can read. A malformed one (a password with a raw %, say, or sslmode=bogus) never
    connects, so it is a fault to fix, not an outage to wait out; and psycopg's own message about it
    quotes the password."""
    try:
        password = conninfo_to_dict(url).get("password") or ""
    except psycopg.ProgrammingError:
        raise ValueError("not a valid PostgreSQL URL: percent-encode what its user name and password hold "
                         "(% as %25, @ as %40, / as %2F, : as %3A)") from None
    # libpq checks the options' values (sslmode, target_session_attrs, a port that is no number) only as
    # it connects, before any network: one it refuses fails every connection, so it is found here.
    attempt = psycopg.pq.PGconn.connect_start(url.encode())
    said = attempt.error_message.decode(errors="replace").strip()
    attempt.finish()  # when they pass, the connection it began is closed at once
    if said.startswith("invalid "):  # about an option's value; the password masked all the same
        said = said.replace(password, "***") if password else said
        raise ValueError(f"not a valid PostgreSQL URL: {said}")
    return url


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class Warehouse:
    """The two tables, and one connection pool that all worker threads borrow connections from."""

    def __init__(self):
        settings = read_settings()
        tables = {"events": sql.Identifier(settings["events_table"]),
                  "rollups": sql.Identifier(settings["rollups_table"])}
        self.store_and_count = STORE_AND_COUNT.format(**tables)
        self.pool = ConnectionPool(
            settings["database_url"],
            min_size=1, max_size=int(os.environ.get("KERNEL_CONCURRENCY") or 1), timeout=CONNECT_TIMEOUT_S,
            # Events locked longer than this by another transaction (a stuck former owner) make the batch retry.
            kwargs={"connect_timeout": CONNECT_TIMEOUT_S, "options": f"-c lock_timeout={LOCK_TIMEOUT_MS}"},
            configure=create_batch_table, name=KERNEL_NAME, open=True,
        )
        try:
            with self.pool.connection() as connection:
                connection.execute(CREATE_TABLES.format(**tables))
        except psycopg.errors.UniqueViolation:  # another replica created them at the same moment
            pass
        except BaseException:
            self.pool.close()
            raise

    def store(self, rows: list[tuple]) -> int:
        """Store the rows that are not stored yet and count them into the rollups, in one transaction;
        how many were new."""
        if not rows:
            return 0
        with self.pool.connection() as connection:  # a transaction, committed when the block ends
            with connection.cursor().copy(COPY_BATCH) as copy:  # COPY is what makes batches fast
                for row in rows:
                    copy.write_row(row)
            stored = connection.execute(self.store_and_count).fetchone()[0]
        topic = rows[0][1]  # a batch is one partition's
        EVENTS_STORED.labels(topic).inc(stored)
        REDELIVERIES_SKIPPED.labels(topic).inc(len(rows) - stored)
        return stored


def create_batch_table(connection: psycopg.Connection) -> None:
    """Each connection's own table for the batch in hand, emptied when its transaction commits."""
    connection.execute(CREATE_BATCH_TABLE)
    connection.commit()


CREATE_TABLES = sql.SQL("""
    CREATE TABLE IF NOT EXISTS {events} (
        message_id uuid PRIMARY KEY,
        topic text NOT NULL,
        partition integer NOT NULL,
        "offset" bigint NOT NULL,
        type text NOT NULL,
        "user" text NOT NULL,
        ts timestamptz NOT NULL,
        event jsonb NOT NULL,
        stored_at timestamptz NOT NULL DEFAULT clock_timestamp()
    );
    CREATE TABLE IF NOT EXISTS {rollups} (
        type text NOT NULL,
        minute timestamptz NOT NULL,
        events bigint NOT NULL,
        PRIMARY KEY (type, minute)
    )""")
CREATE_BATCH_TABLE = """
    CREATE TEMPORARY TABLE IF NOT EXISTS batch (message_id uuid, topic text, partition integer, "offset" bigint,
        type text, "user" text, ts timestamptz, event jsonb) ON COMMIT DELETE ROWS"""
COPY_BATCH = 'COPY batch (message_id, topic, partition, "offset", type, "user", ts, event) FROM STDIN'
# The batch's events not stored yet are inserted (in id order, so that two owners of a partition
# during a rebalance lock them in the same order: the second waits for the first, then skips them),
# and exactly those are counted into the rollups (in key order, so that batches of two partitions
# adding to the same minutes cannot deadlock); the number inserted is returned.
STORE_AND_COUNT = sql.SQL("""
    WITH new AS (
        INSERT INTO {events} (message_id, topic, partition, "offset", type, "user", ts, event)
        SELECT * FROM batch ORDER BY message_id
        ON CONFLICT (message_id) DO NOTHING
        RETURNING type, ts
    ), counted AS (
        INSERT INTO {rollups} (type, minute, events)
        SELECT type, date_trunc('minute', ts), count(*) FROM new GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (type, minute) DO UPDATE SET events = {rollups}.events + excluded.events
    )
    SELECT count(*) FROM new""")
shared_lock = threading.Lock()
shared: Warehouse | None = None


def warehouse() -> Warehouse:
    """Created on first use (after main.py has read .env), once however many threads ask."""
    global shared
    with shared_lock:
        if shared is None:
            shared = Warehouse()
        return shared


if __name__ == "__main__":
    import main

    raise SystemExit(main.run_kernel(process_batch=process_batch, read_settings=read_settings, name=KERNEL_NAME,
                                     default_topic=DEFAULT_TOPIC))
