"""The registry on PostgreSQL (psycopg2): what a lab shares across clusters and years.

Connections are short-lived (one per operation), so a thousand array tasks do not hold a thousand
connections; metrics arrive in batches (see runtime/trainer.py). The password never comes from the URL
stored anywhere: libpq reads it from PGPASSWORD or ~/.pgpass.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..resources import schema_file
from .sql import SQLRegistry
from .urls import redact


class PostgresRegistry(SQLRegistry):
    placeholder = "%s"
    dialect = "postgresql"

    def __init__(self, url: str):
        self.dsn = url
        self.url = redact(url)

    @contextmanager
    def _connect(self, write: bool = True):
        import psycopg2

        try:
            conn = psycopg2.connect(self.dsn, connect_timeout=10)
        except psycopg2.Error as exc:
            # libpq's message can echo the connection string: show the redacted URL instead.
            raise ConnectionError(f"cannot connect to the registry {self.url}: {redact(str(exc)).strip()}") from None
        try:
            with conn:  # commits on success, rolls back on error
                yield conn
        finally:
            conn.close()

    def _base_schema(self) -> str:
        return schema_file("registry.sql").read_text(encoding="utf-8")

    def _columns(self, conn, table: str) -> set[str]:
        rows = self._execute(conn, "SELECT column_name FROM information_schema.columns WHERE table_name = ?", (table,))
        return {r[0] for r in rows.fetchall()}

    def _insert_metrics(self, conn, rows) -> None:
        from psycopg2.extras import execute_values

        execute_values(
            conn.cursor(),
            "INSERT INTO metrics (experiment, task_index, step, key, value, wall_time) VALUES %s"
            " ON CONFLICT (experiment, task_index, step, key) DO UPDATE"
            " SET value = excluded.value, wall_time = excluded.wall_time",
            rows,
            page_size=1000,
        )
