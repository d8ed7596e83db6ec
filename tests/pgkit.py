"""A real PostgreSQL cluster for tests: initdb + pg_ctl in a temporary folder, TCP on loopback.

initdb refuses to run as root, so as root the cluster runs as the system user ``medsecure-pg``
(created if missing; ``.ci/run`` creates it too). Tests that need PostgreSQL fail in CI when it
cannot start, and skip elsewhere only when it truly cannot (no PostgreSQL binaries).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from relaykit import free_port

PG_USER = "medsecure-pg"


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(f"PostgreSQL cannot be started here: {reason}")


class Postgres:
    """A throwaway cluster; ``url`` names its ``relay`` database."""

    def __init__(self) -> None:
        initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            unavailable("initdb/pg_ctl not found (apt-get install postgresql)")
        assert initdb is not None and pg_ctl is not None
        self.pg_ctl = pg_ctl
        self.prefix: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="medsecure-pg-"))
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(PG_USER)
            except KeyError:
                made = subprocess.run(
                    [
                        "useradd",
                        "--system",
                        "--no-create-home",
                        "--shell",
                        "/usr/sbin/nologin",
                        PG_USER,
                    ],
                    capture_output=True,
                    text=True,
                )
                if made.returncode != 0:
                    unavailable(f"cannot create the user {PG_USER}: {made.stderr.strip()}")
            shutil.chown(self.root, PG_USER, PG_USER)
            self.prefix = ["runuser", "-u", PG_USER, "--"]
        self.data = self.root / "data"
        self.port = free_port()
        self.log = self.root / "postgres.log"
        done = subprocess.run(
            [
                *self.prefix,
                initdb,
                "-D",
                str(self.data),
                "-U",
                "medsecure",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            shutil.rmtree(self.root, ignore_errors=True)
            unavailable(f"initdb failed: {done.stderr.strip()[-500:]}")
        self.start()
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE relay")

    @property
    def admin_url(self) -> str:
        return f"postgresql://medsecure@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return f"postgresql://medsecure@127.0.0.1:{self.port}/relay"

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=200"
        done = subprocess.run(
            [
                *self.prefix,
                self.pg_ctl,
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                opts,
                "-w",
                "-t",
                "120",
                "start",
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            self.destroy()
            unavailable(f"pg_ctl start failed: {done.stderr.strip()[-300:]} {log[-500:]}")

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                [*self.prefix, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=120,
            )
        shutil.rmtree(self.root, ignore_errors=True)


def wait(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def fresh_database(cluster: Postgres, name: str) -> str:
    """The URL of a new, empty database of ``cluster`` (for tests that need one of their own)."""
    import psycopg

    with psycopg.connect(cluster.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return cluster.url.rsplit("/", 1)[0] + "/" + name
