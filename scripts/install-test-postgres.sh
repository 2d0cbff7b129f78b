#!/usr/bin/env bash
# Install the PostgreSQL server the sweep tests start: Debian's postgresql package (initdb, pg_ctl, postgres).
#
# Called by tests/experiments/conftest.py (through scripts/pg_cluster.py) when the server binaries are
# missing; safe to run by hand. Needs root and apt-get (Debian/Ubuntu); prints why on one line and exits 1
# when it cannot install, so the tests fail with that message instead of being skipped. The tests start
# their own throw-away server; the cluster Debian's package may create and start is not used.
#
# Environment: GRADWISE_TEST_PG_BIN  the folder with initdb, pg_ctl and postgres the tests use
#              (default: the newest /usr/lib/postgresql/*/bin).
set -euo pipefail

have_server() {
    local dir
    for dir in ${GRADWISE_TEST_PG_BIN:-/usr/lib/postgresql/*/bin}; do
        if [[ -x "$dir/initdb" && -x "$dir/pg_ctl" && -x "$dir/postgres" ]]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

if found="$(have_server)"; then
    echo "install-test-postgres: $found has initdb, pg_ctl and postgres already"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-postgres: cannot install postgresql: apt-get not found (install a PostgreSQL server and set GRADWISE_TEST_PG_BIN to its bin folder)" >&2
    exit 1
fi
if [[ "$EUID" -ne 0 ]]; then
    echo "install-test-postgres: cannot install postgresql: apt-get needs root (run: sudo $0)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -q >&2; then
    echo "install-test-postgres: cannot install postgresql: apt-get update failed (no network or no package mirror?)" >&2
    exit 1
fi
if ! apt-get install -y -q --no-install-recommends postgresql >&2; then
    echo "install-test-postgres: cannot install postgresql: apt-get install postgresql failed" >&2
    exit 1
fi
if ! found="$(have_server)"; then
    echo "install-test-postgres: postgresql installed but no ${GRADWISE_TEST_PG_BIN:-/usr/lib/postgresql/*/bin} has initdb, pg_ctl and postgres" >&2
    exit 1
fi
echo "install-test-postgres: installed $found"
