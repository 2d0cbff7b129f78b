"""A throw-away PostgreSQL server for the sweep tests and benchmarks (not part of gradwise itself).

``find_bindir()`` locates Debian's server binaries (``/usr/lib/postgresql/<version>/bin``:
initdb, pg_ctl, postgres) or the folder named by ``GRADWISE_TEST_PG_BIN``; ``ensure_bindir()``
runs ``scripts/install-test-postgres.sh`` first when they are missing. ``Cluster`` makes a
new cluster in a fresh temporary directory, starts it on a free TCP port of 127.0.0.1 with
durability switched off (``fsync=off``: nothing in it outlives the test), creates a database
and gives its URL; ``stop()`` shuts it down and removes the directory.

initdb and postgres refuse to run as root, and the tests may run as root: then the server
runs as an unprivileged user (``postgres`` where Debian's package made it, else ``nobody``)
and its directory is made in /tmp (which every user can reach) and owned by that user.

    python scripts/pg_cluster.py     # start one, print its URL, stop it on Enter
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

INSTALLER = Path(__file__).resolve().parent / "install-test-postgres.sh"
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
SUPERUSER = "gradwise"
# Durability costs fsyncs that a throw-away test server does not need; the sweep's SQL is the same.
FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
START_TIMEOUT_S = 60
# Trust on 127.0.0.1 and a socket in the server's own directory: a test server with no password to leak.
INITDB_OPTIONS = ("--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C", "--no-instructions")


class ClusterError(RuntimeError):
    """The server could not be installed, made or started; the message is one line saying why."""


def find_bindir() -> Path | None:
    """The folder with initdb, pg_ctl and postgres: ``$GRADWISE_TEST_PG_BIN``, else Debian's newest."""
    if os.environ.get("GRADWISE_TEST_PG_BIN"):
        candidates = [Path(os.environ["GRADWISE_TEST_PG_BIN"])]
    else:
        versions = Path("/usr/lib/postgresql").glob("*/bin")
        candidates = sorted(versions, key=lambda p: _version(p.parent.name), reverse=True)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in SERVER_BINARIES):
            return bindir
    return None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def ensure_bindir(installer: Path = INSTALLER) -> Path:
    """The server binaries, installed by ``installer`` first when missing.

    Raises:
        ClusterError: The installer failed; the message ends with its own last line.
    """
    found = find_bindir()
    if found is not None:
        return found
    result = subprocess.run(["bash", str(installer)], capture_output=True, text=True, check=False)
    found = find_bindir()
    if result.returncode != 0 or found is None:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise ClusterError(f"{installer.name} failed: {lines[-1] if lines else '?'}")
    return found


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: None (this user) unless we are root, whom initdb refuses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ClusterError("running as root and neither a 'postgres' nor a 'nobody' user exists to run the server")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    """One throw-away server with one database; ``url`` is its SQLAlchemy URL."""

    def __init__(self, bindir: Path, database: str = "gradwise") -> None:
        self.bindir = bindir
        self.database = database
        self.user = _server_user()
        # /tmp, not a pytest tmp_path: those are private to the test's user, and the server may be another.
        self.root = Path(tempfile.mkdtemp(prefix="gradwise-pg-"))
        self.data = self.root / "data"
        self.port = 0
        try:
            if self.user is not None:
                os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, *INITDB_OPTIONS)
            self._start()
            self.create_database(database)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """The URL of the database made with the cluster."""
        return self.database_url(self.database)

    def database_url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, database: str) -> str:
        """A new empty database on this server; returns its URL."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, database)
        return self.database_url(database)

    def _start(self) -> None:
        # A free port can be taken between the probe and the server's bind: try a few.
        for _ in range(5):
            self.port = _free_port()
            options = [f"-c listen_addresses=127.0.0.1 -p {self.port}", f"-c unix_socket_directories={self.root}"]
            options += [f"-c {setting}" for setting in FAST_SETTINGS]
            log = self.root / "server.log"
            wait = ["-w", "-t", str(START_TIMEOUT_S)]
            started = self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(log), *wait, "-o", " ".join(options), "start", check=False
            )
            if started.returncode == 0:
                return
            if "could not bind" not in (log.read_text() if log.exists() else ""):
                break
        tail = (log.read_text().strip().splitlines() or ["no server log"])[-1] if log.exists() else started.stderr
        raise ClusterError(f"pg_ctl start failed: {tail.strip()}")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / tool), *args]
        kwargs: dict[str, Any] = {"capture_output": True, "text": True, "check": False, "cwd": self.root}
        if self.user is not None:
            kwargs.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
            kwargs["env"] = {**os.environ, "HOME": str(self.root), "USER": self.user.pw_name}
        result = subprocess.run(command, **kwargs)
        if check and result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise ClusterError(f"{tool} failed: {lines[-1] if lines else f'exit code {result.returncode}'}")
        return result

    def stop(self) -> None:
        """Stop the server (immediately: its data is thrown away) and remove its directory."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    started = time.perf_counter()
    with Cluster(ensure_bindir()) as cluster:
        print(f"{cluster.url}  (started in {time.perf_counter() - started:.1f} s; Enter stops it)", flush=True)
        try:
            input()
        except EOFError:
            pass


if __name__ == "__main__":
    main()
