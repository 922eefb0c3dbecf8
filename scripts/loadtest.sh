#!/usr/bin/env bash
# `make loadtest`: the k6 scripts of loadtest/ (clicks, mixed, spike, soak, outage), a short
# version of each, one after the other, against a private stack on free loopback ports: a
# ClickHouse in a temporary directory and `adbeacon serve` built in release (a fresh instance per
# script, so that its /metrics books are the script's). For outage.js this script stops the
# ClickHouse while k6 runs and starts it again.
#
# Each k6 run prints its summary and ends by checking that every event it got a 2xx for is in
# ClickHouse, once (loadtest/lib.js). A table of all runs follows (also written to
# .data/loadtest/last.md); the exit status is non-zero when a threshold or the books failed.
#
# Settings (environment):
#   LOADTEST_SCRIPTS   which scripts, in order ("clicks mixed spike soak outage")
#   SOAK_DURATION      soak.js's length (60s here; the script's own default is 30m)
#   OUTAGE_AT (15)  OUTAGE_FOR (20)   seconds into outage.js when ClickHouse stops, and for how long
#                      (outage.js then runs OUTAGE_AT + OUTAGE_FOR + 35 s)
#   LOADTEST_RATE_LIMIT  adbeacon's RATE_LIMIT per client address (500, its default): the scripts
#                        spread the load over 20,000 addresses in X-Forwarded-For, trusted from
#                        127.0.0.1, so the limiter works as in production and never refuses
# Each script's own knobs (RATE, DURATION, VIEWS, ...; see its header) pass through, e.g.
# `RATE=4000 LOADTEST_SCRIPTS=clicks scripts/loadtest.sh`.
#
# Never touches servers it did not start: `make run`'s stack, test servers and the like are left
# alone. One load test at a time: the machine has two cores.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
# Shared with the benchmarks: log/die, our servers' start-up and clean-up; see its header.
# shellcheck source-path=SCRIPTDIR source=lib/bench-common.sh
. "$root/scripts/lib/bench-common.sh"
log_tag=loadtest

SCRIPTS="${LOADTEST_SCRIPTS:-clicks mixed spike soak outage}"
OUTAGE_AT="${OUTAGE_AT:-15}"
OUTAGE_FOR="${OUTAGE_FOR:-20}"
check_counts OUTAGE_AT OUTAGE_FOR
k6="$root/.data/venv/bin/k6"

# ---------------------------------------------------------------- prerequisites
[ -x "$k6" ] || die "k6 not found at $k6; run 'bash scripts/deps.sh loadtest' (or 'make loadtest', which does)"
require_tools "run 'make loadtest' to install what is missing" curl python3 clickhouse-server cargo
for s in $SCRIPTS; do
  [ -f "loadtest/$s.js" ] || die "no loadtest/$s.js (LOADTEST_SCRIPTS names clicks, mixed, spike, soak, outage)"
done

# ---------------------------------------------------------------- clean-up
tmp="$(mktemp -d "${TMPDIR:-/tmp}/adbeacon-loadtest.XXXXXX")"
out_dir="$root/.data/loadtest"
mkdir -p "$out_dir"

k6_pid="" # ch_pid, app_pid and watchdog_pid come from bench-common.sh

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local status=$?
  trap '' INT TERM HUP
  stop_pid k6 "$k6_pid" 10
  # adbeacon first, while its ClickHouse still answers, so its shutdown flush does not wait.
  stop_pid adbeacon "$app_pid" 40
  stop_pid clickhouse-server "$ch_pid" 15
  stop_watchdog
  keep_logs "$out_dir/last-logs" "$tmp"/*.log "$tmp"/*.json
  rm -rf "$tmp"
  exit "$status"
}
set_traps cleanup
start_watchdog

# ---------------------------------------------------------------- build
build_release

# ---------------------------------------------------------------- ClickHouse
read -r ch_http ch_tcp app_port k6_port < <(free_ports 4)
start_clickhouse "$ch_http" "$ch_tcp"
app_url="http://127.0.0.1:$app_port"
db=loadtest

# Per script: adbeacon's settings besides the shared ones. outage.js gets a small buffer
# (BUFFER_MAX_BYTES 1MiB, about 10,000 events) so that it fills during the outage and adbeacon
# answers 503; the others run with the defaults.
app_settings() { # SCRIPT -> NAME=VALUE lines
  case "$1" in
    outage) printf '%s\n' BATCH_MAX_BYTES=256KiB BUFFER_MAX_BYTES=1MiB ;;
    # Small segments, so that a log that never deletes them would pass soak.js's limit.
    soak) printf '%s\n' WAL_SEGMENT_BYTES=1MiB ;;
  esac
}

# Per script: k6's settings for the short run (each can be overridden from the environment).
k6_settings() { # SCRIPT -> NAME=VALUE lines
  case "$1" in
    clicks) printf '%s\n' "DURATION=${DURATION:-30s}" ;;
    mixed) printf '%s\n' "DURATION=${DURATION:-45s}" ;;
    soak) printf '%s\n' "DURATION=${SOAK_DURATION:-60s}" "WAL_MAX_MIB=${WAL_MAX_MIB:-4}" ;;
    # After the outage: ClickHouse's start, adbeacon's retry backoff (up to 5 s), the drain, and
    # outage.js's last 10 s ("after"), when every answer must be a 2xx again.
    outage) printf '%s\n' "DURATION=${DURATION:-$((OUTAGE_AT + OUTAGE_FOR + 35))s}" "OUTAGE_AT=$OUTAGE_AT" \
      "OUTAGE_FOR=$OUTAGE_FOR" EXPECT_BUFFER_FULL=1 ;;
  esac
}

start_app() { # SCRIPT
  local settings=()
  mapfile -t settings < <(app_settings "$1")
  log "starting adbeacon on $app_url for $1.js${settings[*]:+ (${settings[*]})}"
  start_adbeacon "$app_bin" "$app_port" "$db" env TRUSTED_PROXIES=127.0.0.1 \
    RATE_LIMIT="${LOADTEST_RATE_LIMIT:-500}" "${settings[@]}"
  wait_ready adbeacon "$app_pid" app_ready "$tmp/adbeacon.log"
}

stop_app() { # SCRIPT
  stop_pid adbeacon "$app_pid" 40
  app_pid=""
  mv "$tmp/adbeacon.log" "$tmp/adbeacon-$1.log"
}

# Stops our ClickHouse OUTAGE_AT seconds into the run and starts it again OUTAGE_FOR later.
# SIGTERM first; ClickHouse 18.16 may take 15 s to shut down under inserts (and may crash on the
# way out), so after 5 s it gets SIGKILL: the outage starts when it is due, either way.
outage() {
  local t0=$SECONDS
  sleep "$OUTAGE_AT"
  log "outage: $((SECONDS - t0)) s into the run, stopping ClickHouse (pid $ch_pid)"
  stop_pid clickhouse-server "$ch_pid" 5
  ch_pid="" # reaped: the clean-up must not signal a number the kernel may give to another process
  log "outage: $((SECONDS - t0)) s, ClickHouse is down"
  sleep "$OUTAGE_FOR"
  log "outage: $((SECONDS - t0)) s, starting ClickHouse again"
  start_clickhouse "$ch_http" "$ch_tcp"
  log "outage: $((SECONDS - t0)) s, ClickHouse answers again"
}

# ---------------------------------------------------------------- the runs
failed=()
for s in $SCRIPTS; do
  start_app "$s"
  mapfile -t vars < <(k6_settings "$s")
  log "k6 run loadtest/$s.js ${vars[*]}; load average $(cut -d' ' -f1-3 /proc/loadavg)"
  # In the background with `wait`, so that a signal runs the trap at once.
  env K6_NO_USAGE_REPORT=true BASE_URL="$app_url" CLICKHOUSE_URL="$ch_url" CLICKHOUSE_DATABASE="$db" \
    K6_API="127.0.0.1:$k6_port" "${vars[@]}" \
    "$k6" run --quiet --no-color --log-format raw --address "127.0.0.1:$k6_port" \
    --summary-export "$tmp/summary-$s.json" "loadtest/$s.js" </dev/null > >(tee "$tmp/k6-$s.log") 2>&1 &
  k6_pid=$!
  watch_pid "$k6_pid" k6
  if [ "$s" = outage ]; then
    # Here, not in a subshell: start_clickhouse sets ch_pid, which the clean-up needs.
    outage
  fi
  set +e
  wait "$k6_pid"
  k6_status=$?
  set -e
  k6_pid=""
  if [ "$k6_status" -ne 0 ]; then
    failed+=("$s (k6 exit $k6_status)")
    log "!!!!! $s.js failed (k6 exit status $k6_status) !!!!!"
  fi
  stop_app "$s"
done

# ---------------------------------------------------------------- report
python3 loadtest/report.py "$tmp" "$SCRIPTS" "$(git_rev)" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" | tee "$out_dir/last.md"

if [ "${#failed[@]}" -gt 0 ]; then
  log "!!!!! failed: ${failed[*]} (logs in $out_dir/last-logs/) !!!!!"
  exit 1
fi
log "all passed; table in $out_dir/last.md, logs in $out_dir/last-logs/"
