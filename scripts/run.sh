#!/usr/bin/env bash
# `make run`: installs what is missing, starts the local stack, builds the
# release binary and runs `adbeacon serve` in the foreground.
#
# Ctrl-C (or SIGTERM) stops the service first, so it can flush its last batch
# into ClickHouse, and then the servers that this run started; servers that
# were already up are left alone.
#
# ADBEACON_BIN runs another binary instead of building ./target/release/adbeacon
# (handy for trying this script without a build).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export CH_HTTP_PORT="${CH_HTTP_PORT:-8123}"
export CH_TCP_PORT="${CH_TCP_PORT:-19000}"
export REDIS_PORT="${REDIS_PORT:-6379}"
APP_STOP_TIMEOUT="${APP_STOP_TIMEOUT:-60}" # seconds before SIGKILL

started_log="$(mktemp)"
app_pid=""

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local status=$? waited=0
  # Finish the clean-up even if Ctrl-C is pressed again; children inherit
  # the ignored SIGINT, so stack.sh's stop isn't cut short either.
  trap '' INT TERM HUP
  # `make run | tee log` closes our output on Ctrl-C (tee dies too); without this, the first
  # message below would kill the script by SIGPIPE and leave the servers running.
  trap '' PIPE
  if [ -n "$app_pid" ] && kill -0 "$app_pid" 2>/dev/null; then
    echo "run: stopping adbeacon (pid $app_pid)" >&2 2>/dev/null || true
    kill -INT "$app_pid" 2>/dev/null || true
    while kill -0 "$app_pid" 2>/dev/null; do
      if [ "$waited" -ge $((APP_STOP_TIMEOUT * 10)) ]; then
        echo "run: adbeacon did not stop within ${APP_STOP_TIMEOUT}s; sending SIGKILL" >&2 2>/dev/null || true
        kill -KILL "$app_pid" 2>/dev/null || true
        break
      fi
      sleep 0.1
      waited=$((waited + 1))
    done
    wait "$app_pid" 2>/dev/null || true
  fi
  local started=()
  mapfile -t started <"$started_log"
  if [ "${#started[@]}" -gt 0 ]; then
    # Through a file, so that a closed terminal pipe cannot cut the stop short.
    bash scripts/stack.sh stop "${started[@]}" >"$started_log.out" 2>&1 || status=1
    cat "$started_log.out" >&2 2>/dev/null || true
  fi
  rm -f "$started_log" "$started_log.out"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

bash scripts/deps.sh run
STACK_STARTED_LOG="$started_log" bash scripts/stack.sh start

if [ -n "${ADBEACON_BIN:-}" ]; then
  app=("$ADBEACON_BIN")
else
  cargo build --release
  app=(./target/release/adbeacon)
fi

export CLICKHOUSE_URL="http://127.0.0.1:$CH_HTTP_PORT"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"

# The local stack has no other instance inserting, so migrations that `serve` leaves to an
# explicit run (those that re-create views on a database with events) are safe here.
"${app[@]}" migrate

# In the background with `wait`, so a signal reaches the trap at once rather
# than after the service exits. setsid keeps the terminal's Ctrl-C from
# reaching the service directly: it gets exactly one SIGINT, from cleanup.
# env --default-signal undoes bash's SIG_IGN of SIGINT for background jobs.
setsid env --default-signal=INT "${app[@]}" serve &
app_pid=$!
set +e
wait "$app_pid"
app_status=$?
set -e
app_pid=""
exit "$app_status"
