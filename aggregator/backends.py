"""The store a storage URL names: `sqlite:///path` (the embedded default) or `postgresql://...`."""

from __future__ import annotations

from aggregator.store import Store
from kernel.storage_url import POSTGRES_SCHEMES


def is_postgres(url: str) -> bool:
    """Whether the URL names a PostgreSQL database."""
    return url.startswith(POSTGRES_SCHEMES)


def open_url(url: str, synchronous: str = "FULL", cache_mib: int = 8, application_name: str = "smame") -> Store:
    """Open (and create or migrate) the store at `url`; raises StoreError saying why it cannot.
    `synchronous` and `cache_mib` are SQLite's (PostgreSQL's are the server's), `application_name` is what
    PostgreSQL shows of the connection (`aggregator.leadership` ends a former leader's sessions by it)."""
    if is_postgres(url):
        from aggregator.postgres import PostgresStore  # psycopg loads only where it is used

        return PostgresStore(url, application_name)
    from aggregator.sqlite import SqliteStore, sqlite_path

    return SqliteStore(sqlite_path(url), synchronous, cache_mib)
