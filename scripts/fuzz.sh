#!/usr/bin/env bash
# `make fuzz` (and part of `make test`): schemathesis against the live service.
#
# Builds the debug binary (the one `cargo test` builds too), starts a private
# ClickHouse and Redis on free ports under a temporary directory (via
# scripts/stack.sh with STACK_DIR, so a `make run` stack on 8123/6379 is never
# touched), runs `adbeacon serve` with admin, read and ingest API keys, and
# lets schemathesis (configured in tests/fuzz/schemathesis.toml) generate
# requests from the service's own /openapi.json. Fails when any response is a
# server error or contradicts the spec; the failing cases are printed with a
# curl command that reproduces each.
#
#   FUZZ_MAX_EXAMPLES (150)  test cases per operation and phase
#   FUZZ_SEED (20240501)     Hypothesis seed: the same seed makes the same run
#   FUZZ_KEEP=1              keep the temporary directory (logs, report)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"

# Debian puts clickhouse-server in /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

schemathesis="$root/.data/venv/bin/schemathesis"
if [ ! -x "$schemathesis" ]; then
  echo "fuzz: $schemathesis is missing; run scripts/deps.sh test" >&2
  exit 1
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/adbeacon-fuzz.XXXXXX")"
app_pid=""

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local status=$?
  trap '' INT TERM HUP
  if [ -n "$app_pid" ] && kill -0 "$app_pid" 2>/dev/null; then
    kill -TERM "$app_pid" 2>/dev/null || true
    # The buffer is tiny; shutdown is quick. Do not wait forever on a hung one.
    for _ in $(seq 1 100); do
      kill -0 "$app_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$app_pid" 2>/dev/null || true
    wait "$app_pid" 2>/dev/null || true
  fi
  # Only what this run started: the stack's pid files live under $tmp.
  STACK_DIR="$tmp/stack" bash scripts/stack.sh stop >/dev/null 2>&1 || status=1
  if [ "${FUZZ_KEEP:-0}" = 1 ] || [ "$status" -ne 0 ]; then
    echo "fuzz: logs and report kept in $tmp" >&2
  else
    rm -rf "$tmp"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# Ports nothing listens on now. The kernel hands out each one at most once
# here; another program could still take one before we bind it, in which case
# stack.sh or the service fails loudly rather than using a foreign server.
read -r ch_http ch_tcp redis_port app_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')

cargo build --quiet
app="$root/target/debug/adbeacon"

started="$tmp/started"
: >"$started"
STACK_DIR="$tmp/stack" STACK_STARTED_LOG="$started" CH_HTTP_PORT="$ch_http" CH_TCP_PORT="$ch_tcp" \
  REDIS_PORT="$redis_port" bash scripts/stack.sh start
# stack.sh reuses a server that already answers on a port; on ports that were
# free a moment ago that would be a stranger's server, so refuse it.
if [ "$(sort "$started" | tr '\n' ' ')" != "clickhouse redis " ]; then
  echo "fuzz: another program took a port meant for the private stack; try again" >&2
  exit 1
fi

# Keys of the three scopes (API_KEYS wants at least 16 characters). The admin
# key goes with every request: the catalog's writes are fuzzed too.
admin_key="fuzz-admin-key-000000000001"
export API_KEYS="admin:$admin_key,read:fuzz-read-key-0000000000002,ingest:fuzz-ingest-key-00000000003"
export FUZZ_ADMIN_KEY="$admin_key"
export HOST=127.0.0.1 PORT="$app_port"
export CLICKHOUSE_URL="http://127.0.0.1:$ch_http"
export REDIS_URL="redis://127.0.0.1:$redis_port/0"
export DATA_DIR="$tmp/adbeacon"
export LOG_FORMAT=json LOG_LEVEL=warn
# Fuzzing posts events for the demo ads; flushing often keeps the buffer small.
export FLUSH_INTERVAL=200ms SEED_DEMO_ADS=true

"$app" serve >"$tmp/adbeacon.log" 2>&1 &
app_pid=$!

base="http://127.0.0.1:$app_port"
for i in $(seq 1 600); do
  if curl -fsS --noproxy '*' --max-time 2 "$base/readyz" >/dev/null 2>&1; then
    break
  fi
  if ! kill -0 "$app_pid" 2>/dev/null || [ "$i" -eq 600 ]; then
    echo "fuzz: adbeacon did not become ready; its log:" >&2
    tail -n 40 "$tmp/adbeacon.log" >&2
    exit 1
  fi
  sleep 0.1
done

echo "fuzz: schemathesis $("$schemathesis" --version | awk '{print $NF}') against $base/openapi.json" >&2
started_at=$SECONDS
set +e
# --config-file comes before `run`; the .hypothesis example database is kept
# out of the tree (generation.database in the config), so runs stay alike.
"$schemathesis" --config-file tests/fuzz/schemathesis.toml run "$base/openapi.json" \
  --max-examples "${FUZZ_MAX_EXAMPLES:-150}" \
  --seed "${FUZZ_SEED:-20240501}" \
  --report junit --report-dir "$tmp/report" \
  --no-color
status=$?
set -e
echo "fuzz: schemathesis finished in $((SECONDS - started_at))s with exit code $status" >&2
if [ "$status" -ne 0 ]; then
  echo "fuzz: service log (warnings and errors):" >&2
  tail -n 40 "$tmp/adbeacon.log" >&2
fi
exit "$status"
