"""The registry in one SQLite file: the zero-setup default, safe for the tasks of one machine at once.

WAL journal + a generous busy timeout let concurrent local tasks write without 'database is locked'.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path

from ..resources import schema_file
from .sql import SQLRegistry


class SQLiteRegistry(SQLRegistry):
    placeholder = "?"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"

    @contextmanager
    def _connect(self, write: bool = True):
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            if write:
                conn.execute("BEGIN IMMEDIATE")
            yield conn
            if write:
                conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    def migrate(self) -> list[int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60)
        try:
            conn.execute("PRAGMA journal_mode = WAL")  # persistent: set once per file
        finally:
            conn.close()
        return super().migrate()

    def _base_schema(self) -> str:
        return schema_file("registry.sqlite.sql").read_text(encoding="utf-8")

    def _columns(self, conn, table: str) -> set[str]:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}  # table: a constant of ours
