"""Memory kernel: store each JSON message in PostgreSQL, once, however often it is delivered.

Input: a JSON object with "user_id" and "text" (non-empty strings); the whole object is stored as
jsonb in MEMORY_TABLE (default "memories"), created if missing, keyed by message_id(message). A
redelivered message (after a crash or a rebalance) hits that key and is not stored again; a new
message at an offset used before (the topic created again, a local broker started over) does not.
The database is DATABASE_URL (default postgresql://127.0.0.1:5432/test). While it is unreachable,
messages are retried (False); one it refuses (say, text with a NUL character) goes to the dead-letter
topic. A DATABASE_URL that can never connect (malformed, or with an option libpq refuses, such as
sslmode=bogus) is a fault to fix, not an outage: the kernel stops (exit 1) with a line naming it,
without its password. Needs `uv sync --extra database`.

    uv run --extra database python -m examples.memory
"""

import atexit
import logging
import os
import threading

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from main import DeadLetter, coordinates, json_object, message_id, setting  # adopting: drop this line

KERNEL_NAME = "memory-kernel"
DEFAULT_TOPIC = "memories"
MAX_VALUE_BYTES = 256 * 1024  # a memory larger than this is refused: dead-lettered
REQUIRED_FIELDS = ("user_id", "text")
CONNECT_TIMEOUT_S = 5  # how long one attempt waits for a connection before the message is retried

log = logging.getLogger(KERNEL_NAME)


def process_message(message) -> bool:
    memory = json_object(message, MAX_VALUE_BYTES, REQUIRED_FIELDS)  # or DeadLetter saying why
    try:
        stored = memories().store(message, memory)
    except psycopg.DataError as refused:  # this message can never be stored
        raise DeadLetter(f"PostgreSQL refused it: {first_line(refused)}") from None
    except (psycopg.OperationalError, PoolTimeout) as error:  # the database is down or overloaded
        log.warning("PostgreSQL unavailable (%s); %s will be retried", first_line(error), coordinates(message))
        return False
    if not stored:
        log.debug("%s was already stored: a redelivery", coordinates(message))
    return True


def read_settings() -> dict:
    """This kernel's own settings. The kernel reads them at start-up and in `python main.py check`, so a
    malformed DATABASE_URL stops it (exit code 2) before the first message."""
    return {"database_url": setting("DATABASE_URL", "postgresql://127.0.0.1:5432/test", parse=postgresql_url,
                                    secret=True),
            "table": setting("MEMORY_TABLE", "memories")}


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


class Memories:
    """The table, and one connection pool that all worker threads borrow connections from."""

    def __init__(self):
        settings = read_settings()
        table = sql.Identifier(settings["table"])
        self.insert = INSERT.format(table)
        self.pool = ConnectionPool(
            settings["database_url"],
            min_size=1, max_size=int(os.environ.get("KERNEL_CONCURRENCY") or 1), timeout=CONNECT_TIMEOUT_S,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S}, name=KERNEL_NAME, open=True,
        )
        try:
            with self.pool.connection() as connection:
                connection.execute(CREATE_TABLE.format(table))
        except BaseException:
            self.pool.close()
            raise
        atexit.register(self.pool.close)

    def store(self, message, memory: dict) -> bool:
        """Insert the memory under the message's id; False if it was there already."""
        with self.pool.connection() as connection:
            row = (message_id(message), message.topic, message.partition, message.offset, memory["user_id"],
                   Jsonb(memory))
            return connection.execute(self.insert, row).rowcount == 1


CREATE_TABLE = sql.SQL("""
    CREATE TABLE IF NOT EXISTS {} (
        message_id text PRIMARY KEY,
        topic text NOT NULL,
        partition integer NOT NULL,
        "offset" bigint NOT NULL,
        user_id text NOT NULL,
        memory jsonb NOT NULL,
        stored_at timestamptz NOT NULL DEFAULT now()
    )""")
# The primary key turns a redelivery into a no-op: exactly one row per message.
INSERT = sql.SQL("""
    INSERT INTO {} (message_id, topic, partition, "offset", user_id, memory) VALUES (%s, %s, %s, %s, %s, %s)
    ON CONFLICT (message_id) DO NOTHING""")
shared_lock = threading.Lock()
shared: Memories | None = None


def memories() -> Memories:
    """Created on first use (after main.py has read .env), once however many threads ask."""
    global shared
    with shared_lock:
        if shared is None:
            shared = Memories()
        return shared


if __name__ == "__main__":
    import main

    raise SystemExit(main.run_kernel(process_message, read_settings=read_settings, name=KERNEL_NAME,
                                     default_topic=DEFAULT_TOPIC))
