"""Pseudonymise identifiers that come from medical headers, so no raw patient ID is ever stored.

A pseudonym is a keyed hash (HMAC-SHA256) of the raw value with a secret salt: the same patient
always gets the same pseudonym on one installation (so splits stay grouped by patient), and the
raw ID cannot be recovered from it without the salt.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SALT_ENV = "MEDSIGHT_SALT"


def salt_file() -> Path:
    """Where the installation's salt lives (``$XDG_CONFIG_HOME/medsight/salt``)."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "medsight" / "salt"


def pseudonym_salt() -> bytes:
    """The salt: ``$MEDSIGHT_SALT`` when set, else a random one created once and kept private."""
    from_env = os.environ.get(SALT_ENV)
    if from_env:
        return from_env.encode()
    path = salt_file()
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(salt)
    return salt


def pseudonymise(raw: str, salt: bytes | None = None) -> str:
    """A stable pseudonym such as ``p-3f9a0c...`` for ``raw`` (empty input stays empty).

    >>> pseudonymise("12345", salt=b"k") == pseudonymise("12345", salt=b"k")
    True
    """
    raw = str(raw).strip()
    if not raw:
        return ""
    key = pseudonym_salt() if salt is None else salt
    return "p-" + hmac.new(key, raw.encode("utf-8"), hashlib.sha256).hexdigest()[:16]
