"""A real PostgreSQL server for the sweep tests: a throw-away cluster per test session.

The server binaries are Debian's ``postgresql`` package; when they are missing,
``scripts/install-test-postgres.sh`` installs them (apt-get, as root). If that cannot be
done the PostgreSQL tests fail with the installer's message; they are never skipped, so
sweeps across machines cannot break unseen. The cluster helpers live in
``scripts/pg_cluster.py``, which ``benchmarks/sweep.py`` uses too.
"""

from __future__ import annotations

import fcntl
import importlib.util
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _pg_cluster() -> ModuleType:
    """scripts/pg_cluster.py as a module (scripts/ is not a package on the path)."""
    if "pg_cluster" not in sys.modules:
        spec = importlib.util.spec_from_file_location("pg_cluster", SCRIPTS / "pg_cluster.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["pg_cluster"] = module
        spec.loader.exec_module(module)
    return sys.modules["pg_cluster"]


pg_cluster = _pg_cluster()


def ensure_postgres(installer: Path) -> Path:
    """The server's bin folder, installed by ``installer`` first when missing; pytest.fail (never skip) if not."""
    # pytest-xdist workers may all get here at once: one installs, the others wait for it (apt has one lock).
    with open(Path(tempfile.gettempdir()) / "gradwise-test-postgres.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return pg_cluster.ensure_bindir(installer)
        except pg_cluster.ClusterError as exc:
            pytest.fail(f"the PostgreSQL sweep tests need a PostgreSQL server; {exc}")


@pytest.fixture(name="pg_cluster", scope="session")
def pg_cluster_fixture() -> ModuleType:
    """scripts/pg_cluster.py, for tests of the helpers themselves."""
    return pg_cluster


@pytest.fixture(name="ensure_postgres")
def ensure_postgres_fixture() -> Callable[[Path], Path]:
    """:func:`ensure_postgres` itself, for the test of its failure path."""
    return ensure_postgres


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Any]:
    """A throw-away PostgreSQL server (a :class:`pg_cluster.Cluster`), stopped and removed after the session."""
    bindir = ensure_postgres(pg_cluster.INSTALLER)
    try:
        cluster = pg_cluster.Cluster(bindir)
    except pg_cluster.ClusterError as exc:
        pytest.fail(f"cannot start the test PostgreSQL server: {exc}")
    with cluster:
        yield cluster


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster: Any) -> str:
    """The URL of the session's database on the throw-away server."""
    return str(postgres_cluster.url)


@pytest.fixture
def fresh_postgres_url(postgres_cluster: Any, request: pytest.FixtureRequest) -> str:
    """The URL of a new empty database for one test: no tables yet, as on a sweep's first start."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    return str(postgres_cluster.create_database(name))
