#!/usr/bin/env bash
# The engines the team-hub tests run on (tests/hub_services.py): PostgreSQL from Debian's
# packages. Idempotent; needs root only to install. moto's S3 server comes with the
# `test` extra (pip) and is started by the tests themselves, as is a throwaway PostgreSQL
# cluster (initdb + pg_ctl in a temp dir, on 127.0.0.1 and a free port, stopped by pid):
# nothing here stays running. Without these engines those tests skip, saying why.
set -euo pipefail

pg_bin() {
    command -v pg_ctl >/dev/null 2>&1 && { dirname "$(readlink -f "$(command -v pg_ctl)")"; return; }
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

bin=$(pg_bin || true)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "services.sh: PostgreSQL is not installed and this is not root: install Debian's postgresql" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends postgresql
    bin=$(pg_bin)
fi

# Smoke test, as the tests will run it: a cluster in a temp dir, one query, stopped.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
as_pg=()
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    chown postgres "$tmp"
    as_pg=(runuser -u postgres --)
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"${as_pg[@]}" "$bin/initdb" -D "$tmp/data" -U postgres -A trust --no-sync -E UTF8 >/dev/null
"${as_pg[@]}" "$bin/pg_ctl" -D "$tmp/data" -l "$tmp/log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $tmp -c fsync=off" start >/dev/null
"$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -Atc 'select version()' postgres
"${as_pg[@]}" "$bin/pg_ctl" -D "$tmp/data" -m fast -w stop >/dev/null
echo "services.sh: PostgreSQL ready in $bin (the tests start their own cluster)"
