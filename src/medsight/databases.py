"""Database URLs as the tuning study and the worklist take them (any SQLAlchemy URL; plain
``postgresql://`` on the installed psycopg 3), and as messages and logs may show them: never
with the password.

>>> masked_url("postgresql://medsight:s3cret@db/tuning")
'postgresql://medsight:***@db/tuning'
"""

from __future__ import annotations

import re


def driver_url(url: str) -> str:
    """``postgresql://`` with the installed driver (psycopg 3), whichever SQLAlchemy default."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def masked_url(url: str, unreadable: str | None = None) -> str:
    """The URL with its password hidden; a text that is no URL is shown as given, or as
    ``unreadable`` when that is given."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL
        return url if unreadable is None else unreadable


def error_reason(exc: BaseException | None, url: str) -> str:
    """The first line of a driver's error, without the driver's name or the URL's password."""
    lines = str(exc or "unknown error").strip().splitlines() or [type(exc).__name__]
    reason = re.sub(r"^\([\w.]+\)\s*", "", lines[0]).replace("connection failed: ", "")
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
    except Exception:  # noqa: BLE001 - not a URL: nothing to hide
        password = None
    if password:
        reason = reason.replace(str(password), "***")
    return " ".join(reason.split())
