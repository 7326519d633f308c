#!/usr/bin/env bash
# Run a command against a throwaway PostgreSQL server:
#   scripts/with-postgres.sh pytest -q
# Starts a server in a temporary directory (initdb as the `postgres` user when run as root;
# a random free port on 127.0.0.1; fsync off), exports DATABASE_URL for the command, and
# stops and deletes the server afterwards, whatever the command's outcome.
# For tests that stop and restart that same server (tests/faults) it also exports
# TEST_PG_BINDIR, TEST_PG_DATADIR, TEST_PG_LOG and TEST_PG_OWNER (the user pg_ctl must run
# as - `postgres` when run as root, else empty); the server's settings live in its
# postgresql.conf, so a plain `pg_ctl -D "$TEST_PG_DATADIR" -w start` brings it back as it was.
# Exit status: the command's; 3 if no PostgreSQL server binaries are installed.
set -euo pipefail

find_bindir() {
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
    pg_config --bindir; return
  fi
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v initdb)")"; return
  fi
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

bindir=$(find_bindir || true)
if [ -z "${bindir:-}" ]; then
  echo "with-postgres: no PostgreSQL server binaries (initdb, pg_ctl) found." >&2
  echo "with-postgres: install them with: sudo apt-get install -y postgresql" >&2
  exit 3
fi

as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  echo "with-postgres: running as root needs a 'postgres' user (Debian's postgresql package creates it)." >&2
  exit 3
fi

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
dir=$(mktemp -d "${TMPDIR:-/tmp}/pgtest.XXXXXX")
chmod 755 "$dir"
[ "$(id -u)" = 0 ] && chown postgres: "$dir"

stop() {
  as_owner "$bindir/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap stop EXIT

as_owner "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; exit 1; }
cat >>"$dir/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = ${PG_MAX_CONNECTIONS:-200}
EOF
as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null \
  || { cat "$dir/server.log" >&2; exit 1; }
as_owner "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres service

export DATABASE_URL="postgresql+psycopg2://postgres@127.0.0.1:$port/service"
export TEST_PG_BINDIR="$bindir" TEST_PG_DATADIR="$dir/data" TEST_PG_LOG="$dir/server.log"
export TEST_PG_OWNER=""
[ "$(id -u)" = 0 ] && TEST_PG_OWNER=postgres
echo "with-postgres: PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port"
set +e
"$@"
status=$?
set -e
exit $status
