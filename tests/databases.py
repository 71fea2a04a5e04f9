"""The machine's real PostgreSQL for tests: a database of the test run's own, made at its start and dropped at
its end, and a schema of each test's own in it, so every test starts on an empty store."""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import psycopg
import psycopg.errors

from aggregator.store import Store

# trust auth on 127.0.0.1, as on the project's machines; another server can be named here
ADMIN_URL = os.environ.get("SMAME_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = ("sqlite", "postgresql")


class PostgresDatabase:
    """A database made for this test run on the server at ADMIN_URL."""

    def __init__(self) -> None:
        self.name = f"smame_test_{os.getpid()}_{secrets.token_hex(3)}"
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            # sorting text as most servers do (en-US), not byte-wise: smame must not depend on the server's
            admin.execute(
                f"CREATE DATABASE {self.name} TEMPLATE template0 "
                "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            )
        self.url = ADMIN_URL.rsplit("/", 1)[0] + "/" + self.name
        self._schemas = 0

    def fresh_url(self) -> str:
        """The URL of an empty schema of its own in the database (the store's tables go there)."""
        self._schemas += 1
        schema = f"test_{self._schemas}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        return schema_url(self.url, schema)

    def drop(self) -> None:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


def schema_url(url: str, schema: str) -> str:
    """The URL of database `url` with `schema` first on its search path: smame's tables go there."""
    return f"{url}{'&' if '?' in url else '?'}options={quote(f'-csearch_path={schema}')}"


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of one query on the store at `url`, read as an operator would, with the database's own client."""
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url[len("sqlite:///") :], timeout=10)) as c:
            return c.execute(sql).fetchall()
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()  # type: ignore[arg-type]


def count(url: str, table: str) -> int:
    """Rows in a table of the store (0 while it has no such table yet)."""
    try:
        return int(query(url, f"SELECT count(*) FROM {table}")[0][0])
    except (sqlite3.OperationalError, psycopg.errors.UndefinedTable):
        return 0


def sqlite_plan(store: Store, sql: str, args: Sequence[Any] = ()) -> str:
    """SQLite's plan of a query on `store`, its steps' words joined (what an index is used for, or a scan)."""
    return " ".join(str(r[-1]) for r in store.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall())
