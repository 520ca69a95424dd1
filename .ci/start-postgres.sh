#!/usr/bin/env bash
# Start a throwaway PostgreSQL on loopback for the ledger tests; print its URL on success.
# Installs Debian's server package when it is missing. Any failure -> exit 1 (tests then skip).
set -euo pipefail
PORT=${SPOTUNE_PG_PORT:-54329}
DATA=${SPOTUNE_PG_DATA:-/tmp/spotune-ci-pg}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then exit 1; fi
  timeout 300 apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq postgresql >/dev/null 2>&1 || exit 1
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi
run_as=()
if [ "$(id -u)" = 0 ]; then run_as=(runuser -u postgres --); fi
if "${run_as[@]}" "$bin/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  "${run_as[@]}" "$bin/pg_ctl" -D "$DATA" -m fast stop >/dev/null 2>&1 || true
fi
rm -rf "$DATA"; mkdir -p "$DATA"
[ "$(id -u)" = 0 ] && chown postgres "$DATA"
"${run_as[@]}" "$bin/initdb" -D "$DATA" -U spotune --auth=trust >/dev/null
"${run_as[@]}" "$bin/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k /tmp" start >/dev/null
"$bin/createdb" -h 127.0.0.1 -p "$PORT" -U spotune spotune_test
echo "postgresql+psycopg://spotune@127.0.0.1:$PORT/spotune_test"
