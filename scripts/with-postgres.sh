#!/usr/bin/env bash
# Run a command against a throwaway PostgreSQL server:
#   scripts/with-postgres.sh [--replica] [--pgbouncer] pytest -q
# Starts a server in a temporary directory (initdb as the `postgres` user when run as root;
# a random free port on 127.0.0.1; fsync off), exports DATABASE_URL for the command, and
# stops and deletes the server afterwards, whatever the command's outcome.
# For tests that stop and restart that same server (tests/faults) it also exports
# TEST_PG_BINDIR, TEST_PG_DATADIR, TEST_PG_LOG and TEST_PG_OWNER (the user pg_ctl must run
# as - `postgres` when run as root, else empty); the server's settings live in its
# postgresql.conf, so a plain `pg_ctl -D "$TEST_PG_DATADIR" -w start` brings it back as it was.
#
# --replica also starts a streaming hot standby of that server (pg_basebackup -R; about half a
# second) and exports TEST_REPLICA_URL, TEST_REPLICA_DATADIR and TEST_REPLICA_LOG (stop and start
# it like the primary). --pgbouncer also starts PgBouncer in transaction pooling mode in front of
# the primary and exports TEST_PGBOUNCER_URL (and TEST_PGBOUNCER_SMALL_POOL_URL: the same database
# through only 2 server connections, so that clients must share them); without a pgbouncer binary it prints a warning and
# exports nothing (tests needing it skip, or fail under REQUIRE_PGBOUNCER=1).
# Exit status: the command's; 77 if no PostgreSQL server binaries are installed (automake's
# "skipped": no test runner exits with it, pytest's own statuses are 0-5).
set -euo pipefail

with_replica=0
with_pgbouncer=0
while [ $# -gt 0 ]; do
  case "$1" in
    --replica) with_replica=1; shift ;;
    --pgbouncer) with_pgbouncer=1; shift ;;
    *) break ;;
  esac
done

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
  exit 77
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
  exit 77
fi

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port=$(free_port)
dir=$(mktemp -d "${TMPDIR:-/tmp}/pgtest.XXXXXX")
chmod 755 "$dir"
[ "$(id -u)" = 0 ] && chown postgres: "$dir"

stop() {
  if [ -f "$dir/pgbouncer.pid" ]; then kill "$(cat "$dir/pgbouncer.pid")" 2>/dev/null || true; fi
  if [ -d "$dir/replica" ]; then
    as_owner "$bindir/pg_ctl" -D "$dir/replica" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  as_owner "$bindir/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap stop EXIT

as_owner "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 --no-sync >"$dir/initdb.log" 2>&1 \
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

if [ "$with_replica" = 1 ]; then
  # initdb's pg_hba.conf already trusts replication connections from 127.0.0.1.
  replica_port=$(free_port)
  as_owner "$bindir/pg_basebackup" -h 127.0.0.1 -p "$port" -U postgres -D "$dir/replica" -R -X stream -c fast \
    >"$dir/basebackup.log" 2>&1 || { cat "$dir/basebackup.log" >&2; exit 1; }
  cat >>"$dir/replica/postgresql.conf" <<EOF
port = $replica_port
hot_standby = on
EOF
  as_owner "$bindir/pg_ctl" -D "$dir/replica" -l "$dir/replica.log" -w start >/dev/null \
    || { cat "$dir/replica.log" >&2; exit 1; }
  export TEST_REPLICA_URL="postgresql+psycopg2://postgres@127.0.0.1:$replica_port/service"
  export TEST_REPLICA_DATADIR="$dir/replica" TEST_REPLICA_LOG="$dir/replica.log"
  echo "with-postgres: streaming hot standby on 127.0.0.1:$replica_port"
fi

if [ "$with_pgbouncer" = 1 ]; then
  pgbouncer=$(command -v pgbouncer || ls /usr/sbin/pgbouncer 2>/dev/null || true)
  if [ -z "$pgbouncer" ]; then
    echo "with-postgres: WARNING no pgbouncer binary (sudo apt-get install -y pgbouncer); not started" >&2
  else
    bouncer_port=$(free_port)
    echo '"postgres" ""' >"$dir/userlist.txt"
    cat >"$dir/pgbouncer.ini" <<EOF
[databases]
service = host=127.0.0.1 port=$port dbname=service
; the same database through 2 server connections: clients must share them
service_small = host=127.0.0.1 port=$port dbname=service pool_size=2
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
unix_socket_dir = $dir
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 1000
ignore_startup_parameters = extra_float_digits
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
EOF
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir/userlist.txt" "$dir/pgbouncer.ini"; fi
    as_owner "$pgbouncer" -d "$dir/pgbouncer.ini" >/dev/null 2>&1 \
      || { cat "$dir/pgbouncer.log" >&2 || true; exit 1; }
    export TEST_PGBOUNCER_URL="postgresql+psycopg2://postgres@127.0.0.1:$bouncer_port/service"
    export TEST_PGBOUNCER_SMALL_POOL_URL="postgresql+psycopg2://postgres@127.0.0.1:$bouncer_port/service_small"
    echo "with-postgres: PgBouncer $("$pgbouncer" --version | head -n 1 | awk '{print $2}') (transaction pooling) on 127.0.0.1:$bouncer_port"
  fi
fi
set +e
"$@"
status=$?
set -e
exit $status
