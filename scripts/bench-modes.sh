#!/usr/bin/env bash
# `make bench` (third part): what each ACK_MODE costs on POST /ads/click, side by side in one run:
# buffered (a 2xx once the event is in memory), wal (once it is written to the local write-ahead
# log, fsynced within WAL_FSYNC, by default 10 ms), wal-always (WAL_FSYNC=always: fsynced before the
# 2xx, one fsync per group of requests) and committed (once ClickHouse holds it).
#
# For each mode, in turn against one private ClickHouse: adbeacon starts with that ACK_MODE, a
# warm-up, then wrk at saturation (BENCH_CONNECTIONS connections as fast as they go, best of
# BENCH_ROUNDS), then wrk paced at about half of *buffered*'s saturation (the same offered load for
# every mode; loadtest/wrk/click.lua's WRK_DELAY_MS). Then adbeacon stops (SIGTERM, so its last
# batch is flushed) and every acknowledged click must be in ClickHouse. The report (also in
# .data/bench/last-modes.md) gives throughput, p50 and p99 of each, wal's and committed's share of
# buffered, and for wal how many requests shared one fsync.
#
# Settings (environment): BENCH_CONNECTIONS (64), BENCH_DURATION (10s), BENCH_WARMUP (3s),
# BENCH_ROUNDS (2), BENCH_PIN (1: wrk on the last core, adbeacon on the others; 0: unpinned).
# Target (issue 6): wal throughput >= 80 % of buffered at saturation (judged for the default
# WAL_FSYNC; wal-always's share is printed next to it).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
# shellcheck source-path=SCRIPTDIR source=lib/bench-common.sh
. "$root/scripts/lib/bench-common.sh"
log_tag=bench-modes

THREADS=1
CONNECTIONS="${BENCH_CONNECTIONS:-64}"
DURATION="${BENCH_DURATION:-10s}"
WARMUP="${BENCH_WARMUP:-3s}"
ROUNDS="${BENCH_ROUNDS:-2}"
TARGET_PCT=80
check_counts CONNECTIONS ROUNDS

command -v wrk >/dev/null 2>&1 || die "wrk not found; install it with 'apt-get install wrk' (or run 'make bench', which does)"
require_tools "run 'make bench' to install what is missing" curl python3 clickhouse-server cargo
clk_tck="$(getconf CLK_TCK)"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/adbeacon-bench-modes.XXXXXX")"
out_dir="$root/.data/bench"
mkdir -p "$out_dir"
wrk_pid=""

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local status=$?
  trap '' INT TERM HUP
  stop_pid wrk "$wrk_pid" 5
  stop_pid adbeacon "$app_pid" 40
  stop_pid clickhouse-server "$ch_pid" 10
  stop_watchdog
  keep_logs "$out_dir/last-modes-logs" "$tmp"/*.log "$tmp"/wrk-*.txt
  rm -rf "$tmp"
  exit "$status"
}
set_traps cleanup
start_watchdog

build_release

pin_cores
pinning="none (BENCH_PIN=0 or nproc=$ncpu)"
if [ -n "$wrk_cpu" ]; then pinning="wrk ($wrk_rt_note) on cpu $wrk_cpu; adbeacon on cpu $srv_cpus; ClickHouse unpinned"; fi
log "pinning: $pinning"

read -r ch_http ch_tcp app_port < <(free_ports 3)
start_clickhouse "$ch_http" "$ch_tcp"
app_url="http://127.0.0.1:$app_port"

ch_query() { curl -fsS --noproxy '*' --max-time 30 "$ch_url/" --data-binary "$1"; }
ms() { awk -v us="$1" 'BEGIN { printf "%.2f ms", us / 1000 }'; }
rps_fmt() { awk -v r="$1" 'BEGIN { printf "%.0f", r }'; }
better() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a > b) }'; }
# Context switches of all of PID's threads so far (voluntary and not): the cost of handing work
# between threads, which CPU seconds on a shared machine blur.
ctx_switches() { # PID
  cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { s += $2 } END { print s + 0 }'
}

declare -A sat_rps sat_p50 sat_p99 half_rps half_p50 half_p99 cpu_per_m cs_per_req per_fsync
delay_ms=""
status=0

# A row of the report: its ACK_MODE, and its WAL_FSYNC when not the default.
variants=(buffered wal wal-always committed)
for mode in "${variants[@]}"; do
  db="bench_${mode//-/_}"
  ack_mode="${mode%%-*}"
  # The other rows take WAL_FSYNC from the environment: the service's default unless set.
  fsync="${WAL_FSYNC:-}"
  if [ "$mode" = wal-always ]; then fsync=always; fi
  log "---- ACK_MODE=$ack_mode WAL_FSYNC=${fsync:-(default)}"
  ACK_MODE="$ack_mode" WAL_FSYNC="$fsync" start_adbeacon "$app_bin" "$app_port" "$db" "${srv_pin[@]}"
  wait_ready adbeacon "$app_pid" app_ready "$tmp/adbeacon.log"
  unset WRK_DELAY_MS
  run_wrk "$mode-warm-up" "$app_url" "$WARMUP"
  await_flush
  cpu_before="$(cpu_ticks "$app_pid")"
  cs_before="$(ctx_switches "$app_pid")"
  accepted_before="$(metric '^adbeacon_events_accepted_total')"
  best=0
  for round in $(seq 1 "$ROUNDS"); do
    run_wrk "$mode-saturation-$round" "$app_url" "$DURATION"
    if [ "$r_non2xx" != 0 ] || [ "$r_errors" != 0 ]; then
      log "!!!!! $mode: $r_non2xx non-2xx, $r_errors socket errors"
      status=1
    fi
    if better "$r_rps" "$best"; then
      best="$r_rps" sat_rps[$mode]="$r_rps" sat_p50[$mode]="$r_p50" sat_p99[$mode]="$r_p99"
    fi
  done
  cpu_after="$(cpu_ticks "$app_pid")"
  cs_after="$(ctx_switches "$app_pid")"
  accepted_after="$(metric '^adbeacon_events_accepted_total')"
  cs_per_req[$mode]="$(awk -v c=$((cs_after - cs_before)) -v n=$((accepted_after - accepted_before)) \
    'BEGIN { if (n > 0) printf "%.2f", c / n; else print "n/a" }')"
  cpu_per_m[$mode]="$(awk -v t=$((cpu_after - cpu_before)) -v hz="$clk_tck" -v n=$((accepted_after - accepted_before)) \
    'BEGIN { if (n > 0) printf "%.1f", t / hz / n * 1e6; else print "n/a" }')"
  if [ -z "$delay_ms" ]; then
    # Half of buffered's saturation: each connection waits CONNECTIONS*1000/(rate/2) ms, less
    # the answer's own time; wrk paces in whole milliseconds, so this is rounded down (at least 1).
    delay_ms="$(awk -v c="$CONNECTIONS" -v r="${sat_rps[buffered]}" 'BEGIN { d = int(c * 1000 / (r / 2)); print (d < 1 ? 1 : d) }')"
    log "half of buffered's saturation: WRK_DELAY_MS=$delay_ms per connection"
  fi
  export WRK_DELAY_MS="$delay_ms"
  run_wrk "$mode-half" "$app_url" "$DURATION"
  unset WRK_DELAY_MS
  if [ "$r_non2xx" != 0 ] || [ "$r_errors" != 0 ]; then
    log "!!!!! $mode paced: $r_non2xx non-2xx, $r_errors socket errors"
    status=1
  fi
  half_rps[$mode]="$r_rps" half_p50[$mode]="$r_p50" half_p99[$mode]="$r_p99"
  if [ "$ack_mode" = wal ]; then
    appends="$(metric '^adbeacon_wal_appends_total$')"
    syncs="$(metric '^adbeacon_wal_fsync_duration_seconds_count$')"
    per_fsync[$mode]="$(awk -v a="$appends" -v s="$syncs" 'BEGIN { if (s > 0) printf "%.1f", a / s; else print "n/a" }')"
  fi
  accepted="$(metric '^adbeacon_events_accepted_total')"
  stop_pid adbeacon "$app_pid" 40
  app_pid=""
  stored="$(ch_query "SELECT count() FROM $db.events")"
  log "$mode: accepted $accepted, stored $stored"
  if [ "$accepted" != "$stored" ]; then
    log "!!!!! $mode: $accepted acknowledged, $stored in ClickHouse !!!!!"
    status=1
  fi
done

pct() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", 100 * a / b }'; }
wal_pct="$(pct "${sat_rps[wal]}" "${sat_rps[buffered]}")"
always_pct="$(pct "${sat_rps[wal-always]}" "${sat_rps[buffered]}")"
verdict="$(awk -v p="$wal_pct" -v t="$TARGET_PCT" 'BEGIN { print (p >= t ? "PASS" : "BELOW") }')"
rev="$(git_rev)"
when="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
{
  echo "<!-- scripts/bench-modes.sh, $when, rev $rev -->"
  echo "| ACK_MODE | saturation req/s | p50 | p99 | share of buffered | paced req/s | p50 | p99 | CPU s per million | context switches per request |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for mode in "${variants[@]}"; do
    echo "| $mode | $(rps_fmt "${sat_rps[$mode]}") | $(ms "${sat_p50[$mode]}") | $(ms "${sat_p99[$mode]}") |" \
      "$(pct "${sat_rps[$mode]}" "${sat_rps[buffered]}") % | $(rps_fmt "${half_rps[$mode]}") | $(ms "${half_p50[$mode]}") |" \
      "$(ms "${half_p99[$mode]}") | ${cpu_per_m[$mode]} | ${cs_per_req[$mode]} |"
  done
  echo
  echo "Target: wal >= ${TARGET_PCT}% of buffered at saturation: **$verdict** ($wal_pct % with WAL_FSYNC=${WAL_FSYNC:-10ms (default)}; $always_pct % with WAL_FSYNC=always)."
  echo "Requests per fsync (group commit): wal ${per_fsync[wal]}, wal-always ${per_fsync[wal-always]}."
  echo "Load: wrk -t1 -c$CONNECTIONS, POST /ads/click; saturation best of $ROUNDS x $DURATION; paced: WRK_DELAY_MS=$delay_ms" \
    "per connection (about half of buffered's saturation), $DURATION; $ncpu CPUs; pinning: $pinning."
} | tee "$out_dir/last-modes.md"
exit "$status"
