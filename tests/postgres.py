"""A real PostgreSQL server for tests: the one ``$MEDSIGHT_TEST_POSTGRES`` names, else a
throwaway cluster started here, else the tests are skipped (failed under ``CI=true``).

Use it from a test module with ``pytest_plugins = ["tests.postgres"]``:

- ``postgres_server`` (session): the server's URL (a superuser, password in the URL);
- ``postgres_url`` (per test): the URL of a fresh database, dropped after the test.

The throwaway cluster (``initdb`` into a temporary folder, password authentication, listening
on a free loopback port, its socket in that folder) is stopped and removed at the end of the
session. As root, the server runs as the ``postgres`` user (else ``nobody``): PostgreSQL refuses
to run as root. The same code serves CI from the shell::

    python -m tests.postgres start DIR   # prints the URL; DIR is an empty folder (mktemp -d)
    python -m tests.postgres stop DIR    # stops the server and removes DIR
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: A URL (``postgresql://user:password@host:port/db``) of a server the tests may create and
#: drop databases on; ``.ci/run`` sets it after starting its own throwaway cluster.
ENV = "MEDSIGHT_TEST_POSTGRES"
USER = "medsight"


def binaries() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres`` (newest first), or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2].split(".")[0])
    )
    for folder in reversed(versions):
        if all((Path(folder) / name).exists() for name in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


def _server_user() -> str | None:
    """The OS user to run the server as: None (this one) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither the 'postgres' nor the 'nobody' user exists")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Cluster:
    root: Path
    url: str

    def stop(self) -> None:
        stop(self.root)


def _run(args: list[str], user: str | None) -> None:
    kwargs = {}
    if user is not None:
        entry = pwd.getpwnam(user)
        kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    done = subprocess.run(args, capture_output=True, text=True, cwd="/", **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed: {(done.stderr or done.stdout).strip()}")


def start(root: Path) -> Cluster:
    """Create a cluster in the empty folder ``root`` and start it on a free loopback port."""
    folder = binaries()
    if folder is None:
        raise RuntimeError(
            "PostgreSQL is not installed (no initdb/pg_ctl; apt-get install postgresql)"
        )
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    user = _server_user()
    password = secrets.token_hex(16)
    (root / "pwfile").write_text(password + "\n")
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (root, root / "pwfile"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(root, 0o700)
    _run(
        [
            str(folder / "initdb"),
            "-D",
            str(root / "data"),
            "-U",
            USER,
            f"--pwfile={root / 'pwfile'}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ],
        user,
    )
    (root / "pwfile").unlink()
    error: Exception | None = None
    for _ in range(3):  # a free port may be taken before the server binds it
        port = _free_port()
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
        try:
            _run(
                [str(folder / "pg_ctl"), "start", "-w", "-D", str(root / "data"), "-o", options]
                + ["-l", str(root / "server.log")],
                user,
            )
        except RuntimeError as exc:
            error = exc
            continue
        url = f"postgresql://{USER}:{password}@127.0.0.1:{port}/postgres"
        return Cluster(root, url)
    log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
    raise RuntimeError(f"{error}\n{log[-2000:]}")


def stop(root: Path) -> None:
    """Stop the server of the cluster in ``root`` (fast: open sessions are ended) and remove it."""
    root = Path(root)
    folder = binaries()
    if folder is not None and (root / "data" / "postmaster.pid").exists():
        try:
            _run(
                [str(folder / "pg_ctl"), "stop", "-m", "fast", "-D", str(root / "data")],
                _server_user(),
            )
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
    shutil.rmtree(root, ignore_errors=True)


def _connect(url: str):
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=10)


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"PostgreSQL is required in CI: {reason}", pytrace=False)
    pytest.skip(f"no PostgreSQL server: {reason}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A superuser URL of a running server: ``$MEDSIGHT_TEST_POSTGRES`` or a throwaway one."""
    given = os.environ.get(ENV)
    if given:
        try:
            _connect(given).close()
        except Exception as exc:  # noqa: BLE001 - any failure: the server cannot be used
            pytest.fail(f"${ENV} names a server that cannot be reached: {exc}", pytrace=False)
        yield given
        return
    root = Path(tempfile.mkdtemp(prefix="medsight-pg-"))
    try:
        cluster = start(root)
    except Exception as exc:  # noqa: BLE001 - no binaries, no user, no port
        shutil.rmtree(root, ignore_errors=True)
        _unavailable(str(exc))
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """The URL of a database created for this test alone, dropped (with any session) after it."""
    from sqlalchemy.engine import make_url

    name = f"medsight_test_{uuid.uuid4().hex[:12]}"
    admin = _connect(postgres_server)
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        yield make_url(postgres_server).set(database=name).render_as_string(hide_password=False)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python -m tests.postgres start|stop DIR", file=sys.stderr)
        return 2
    if argv[0] == "stop":
        stop(Path(argv[1]))
        return 0
    try:
        print(start(Path(argv[1])).url)
    except RuntimeError as exc:
        print(f"PostgreSQL could not be started: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
