"""Registry URLs: which backend, and the same URL with any password removed for display and storage."""

from __future__ import annotations

import re

_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]+):[^@\s]*@", re.I)
_KEYWORD = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.I)


def redact(text: str) -> str:
    """`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`, also inside any message,
    and `password=secret` keyword pairs -> `password=***`."""
    return _KEYWORD.sub(r"\1***", _PASSWORD.sub(r"\g<head>:***@", text))


def has_password(url: str) -> bool:
    return redact(url) != url


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))
