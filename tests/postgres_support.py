"""A throwaway PostgreSQL server for the tests, from the Debian `postgresql` package.

`start_postgres()` runs `initdb` into a fresh temporary folder and `pg_ctl start` on a free
127.0.0.1 port (trust authentication, no durability settings: it lives for one session).
PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
`postgres` user the Debian package creates. `make test-deps` installs the package; without
its binaries `start_postgres` skips the calling tests and says so.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPERUSER = "kiln"


def postgres_bin() -> Path | None:
    """The folder of `initdb` and `pg_ctl`: Debian's newest /usr/lib/postgresql/*/bin first."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    on_path = shutil.which("pg_ctl")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """A running throwaway server; `new_database()` gives each test its own database."""

    bin: Path
    data: Path
    port: int
    user: str | None
    count: int = 0

    def url(self, database: str = "postgres") -> str:
        """The connection URL of one database on this server."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database; its URL."""
        import psycopg

        self.count += 1
        name = f"kiln_test_{self.count}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=60,
            user=self.user,
            group=self.user,
            extra_groups=[] if self.user else None,
            cwd=self.data,
        )

    def stop(self) -> None:
        """Stop the server at once and delete its files."""
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self.data / "db"), "-m", "immediate", "stop")
        shutil.rmtree(self.data, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """Initialise and start a server; fails the test when PostgreSQL is not installed (CI
    must run the PostgreSQL tests, and `make test` installs it first)."""
    folder = postgres_bin()
    if folder is None:
        pytest.fail(
            "PostgreSQL server binaries (initdb, pg_ctl) are not installed: run "
            "`make test-deps` (apt-get install postgresql)"
        )
    user = None
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail(
                "running as root needs the postgres user that Debian's postgresql package "
                "creates: `make test-deps` installs it"
            )
        user = account.pw_name
    data = Path(tempfile.mkdtemp(prefix="kiln-postgres-"))
    if user is not None:
        os.chown(data, account.pw_uid, account.pw_gid)
    server = PostgresServer(folder, data, _free_port(), user)
    init = server._run(
        "initdb", "-D", str(data / "db"), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
        "--no-sync", "--no-instructions",
    )  # fmt: skip
    if init.returncode != 0:
        server.stop()
        raise RuntimeError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
    options = (
        f"-p {server.port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off"
    )
    started = server._run(
        "pg_ctl", "-D", str(data / "db"), "-o", options, "-l", str(data / "log"), "-w", "start"
    )
    if started.returncode != 0:
        log = (data / "log").read_text() if (data / "log").exists() else ""
        server.stop()
        raise RuntimeError(f"pg_ctl start failed:\n{started.stdout}\n{started.stderr}\n{log}")
    return server
