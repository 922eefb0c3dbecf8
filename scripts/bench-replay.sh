#!/usr/bin/env bash
# `make bench-replay` (and the last part of `make bench`): what an outage and its replay cost.
#
# One private ClickHouse, one private Redis, one release adbeacon (ACK_MODE=wal, the default):
#   1. normal: POST /ads/click paced at a moderate load (BENCH_CONNECTIONS connections, each
#      waiting BENCH_DELAY_MS after an answer), BENCH_DURATION: the live p99 at rest;
#   2. saturation, then outage: wrk at saturation for BENCH_OUTAGE with ClickHouse up, then the same
#      with ClickHouse stopped: every batch goes to the Redis spill; the accepted rate against the
#      normal one (target: at least 75 %), and the spill's throughput in events per second;
#   3. drain: ClickHouse back, the same paced load as in 1 while the replayer drains the backlog:
#      the live p99 during the replay (target: no worse than 2x the p99 at rest), the replay's rate;
#   then the paced load once more after the drain: the same process and data without a replay,
#   a second baseline (the first comes from a fresh process and an empty database);
#   4. accounting: once the spill is empty, every acknowledged click is in ClickHouse exactly once
#      (count() = uniqExact(event_id) = adbeacon_events_accepted_total).
# The report is also written to .data/bench/last-replay.md.
#
# Settings (environment): BENCH_CONNECTIONS (16), BENCH_DELAY_MS (5), BENCH_DURATION (30s),
# BENCH_OUTAGE (30s), BENCH_PIN (1: adbeacon on its own cores, wrk, ClickHouse and Redis on the
# last one, as in production, where ClickHouse and Redis run on machines of their own and a
# replay's INSERTs cost them, not adbeacon's cores; ClickHouse and Redis run at nice 19, and
# under SCHED_IDLE during the paced runs, so that they never delay wrk's timing (yield_others in
# bench-common.sh); 0: unpinned).
# REPLAY_RATE and the other adbeacon settings pass through to the service.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
# shellcheck source-path=SCRIPTDIR source=lib/bench-common.sh
. "$root/scripts/lib/bench-common.sh"
log_tag=bench-replay

THREADS=1
CONNECTIONS="${BENCH_CONNECTIONS:-16}"
DELAY_MS="${BENCH_DELAY_MS:-5}"
DURATION="${BENCH_DURATION:-30s}"
OUTAGE="${BENCH_OUTAGE:-30s}"
TARGET_RATIO=2
check_counts CONNECTIONS DELAY_MS

command -v wrk >/dev/null 2>&1 || die "wrk not found; install it with 'apt-get install wrk' (or run 'make bench', which does)"
require_tools "run 'make bench' to install what is missing" curl python3 clickhouse-server redis-server redis-cli cargo

tmp="$(mktemp -d "${TMPDIR:-/tmp}/adbeacon-bench-replay.XXXXXX")"
out_dir="$root/.data/bench"
mkdir -p "$out_dir"
wrk_pid="" redis_pid=""

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local status=$?
  trap '' INT TERM HUP
  stop_pid wrk "$wrk_pid" 5
  stop_pid adbeacon "$app_pid" 40
  stop_pid clickhouse-server "$ch_pid" 10
  stop_pid redis-server "$redis_pid" 10
  stop_watchdog
  keep_logs "$out_dir/last-replay-logs" "$tmp"/*.log "$tmp"/wrk-*.txt
  rm -rf "$tmp"
  exit "$status"
}
set_traps cleanup
start_watchdog

build_release

pin_cores
pinning="none (BENCH_PIN=0 or nproc=$ncpu)"
if [ -n "$wrk_cpu" ]; then
  pinning="adbeacon on cpu $srv_cpus; wrk ($wrk_rt_note), and ClickHouse and Redis at nice 19, their autogroups too (SCHED_IDLE during the paced runs), on cpu $wrk_cpu"
fi
log "pinning: $pinning"

read -r ch_http ch_tcp redis_port app_port < <(free_ports 4)

start_clickhouse "$ch_http" "$ch_tcp"
pin_others "$ch_pid"

# Redis as production should run it for the spill: noeviction, append-only (fsync every second).
mkdir -p "$tmp/redis"
(cd "$tmp/redis" && exec setsid redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$tmp/redis" \
  --save "" --appendonly yes --maxmemory-policy noeviction) </dev/null >"$tmp/redis.log" 2>&1 &
redis_pid=$!
watch_pid "$redis_pid" redis-server
# shellcheck disable=SC2317  # called through wait_ready
redis_ping() { [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ]; }
wait_ready Redis "$redis_pid" redis_ping "$tmp/redis.log"
pin_others "$redis_pid"

app_url="http://127.0.0.1:$app_port"
db=bench_replay
REDIS_URL="redis://127.0.0.1:$redis_port/0" start_adbeacon "$app_bin" "$app_port" "$db" "${srv_pin[@]}"
wait_ready adbeacon "$app_pid" app_ready "$tmp/adbeacon.log"

ch_query() { curl -fsS --noproxy '*' --max-time 30 "$ch_url/" --data-binary "$1"; }
ms() { awk -v us="$1" 'BEGIN { printf "%.2f ms", us / 1000 }'; }
rps_fmt() { awk -v r="$1" 'BEGIN { printf "%.0f", r }'; }
backlog() { redis-cli -p "$redis_port" get adbeacon:spill:events 2>/dev/null | awk '{ print ($1 == "" ? 0 : $1) }'; }
now_ms() { date +%s%3N; }
# adbeacon's own timing of POST /ads/click (http_request_duration_seconds, from the request's
# arrival in its handler chain to its answer): saved before and after a run, the difference gives
# the p99 of that run as the service measured it, without what the kernel and wrk's core add.
hist_snap() { # FILE
  curl -fsS --noproxy '*' --max-time 5 "$app_url/metrics" |
    grep '^http_request_duration_seconds_bucket{path="/ads/click",' >"$1" || true
}
hist_p99() { # BEFORE AFTER -> p99 in microseconds, linear within its bucket
  python3 - "$1" "$2" <<'PY'
import re, sys
def load(path):
    counts = {}
    for line in open(path):
        le = re.search(r'le="([^"]+)"', line).group(1)
        counts[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return counts
before, after = load(sys.argv[1]), load(sys.argv[2])
if not before:  # no snapshot before the run: not measured (after alone would count since start)
    after = {}
buckets = sorted((le, after[le] - before.get(le, 0)) for le in after)
total = buckets[-1][1] if buckets else 0
lower, below = 0.0, 0.0
for le, n in buckets:
    if total and n >= 0.99 * total:
        upper = lower * 2 if le == float("inf") else le
        share = (0.99 * total - below) / (n - below) if n > below else 1.0
        print(round((lower + (upper - lower) * share) * 1e6))
        break
    lower, below = le, n
else:
    print(0)
PY
}
status=0

log "---- 1. normal: paced load, ClickHouse up"
unset WRK_DELAY_MS
run_wrk warm-up "$app_url" 3s
await_flush
export WRK_DELAY_MS="$DELAY_MS"
yield_others "$ch_pid" "$redis_pid"
hist_snap "$tmp/hist-normal-0"
run_wrk normal "$app_url" "$DURATION"
normal_rps="$r_rps" normal_p50="$r_p50" normal_p99="$r_p99"
hist_snap "$tmp/hist-normal-1"
unset WRK_DELAY_MS
unyield_others "$ch_pid" "$redis_pid"

log "---- 2. saturation with ClickHouse up, then with it stopped"
run_wrk saturation "$app_url" "$OUTAGE"
sat_rps="$r_rps" sat_p99="$r_p99"
await_flush
log "---- outage: ClickHouse stopped, saturation"
stop_pid clickhouse-server "$ch_pid" 10
ch_pid=""
spilled_before="$(metric '^adbeacon_events_spilled_total$')"
t0="$(now_ms)"
run_wrk outage "$app_url" "$OUTAGE"
outage_rps="$r_rps" outage_p99="$r_p99" outage_non2xx="$r_non2xx"
sleep 2 # the last batches are due within FLUSH_INTERVAL
spilled=$(($(metric '^adbeacon_events_spilled_total$') - spilled_before))
spill_eps="$(awk -v n="$spilled" -v ms=$(($(now_ms) - t0)) 'BEGIN { printf "%.0f", n * 1000 / ms }')"
backlog_start="$(backlog)"
log "spilled $spilled events during the outage; backlog $backlog_start events"

log "---- 3. drain: ClickHouse back, the same paced load while the backlog replays"
start_clickhouse "$ch_http" "$ch_tcp"
pin_others "$ch_pid"
yield_others "$ch_pid" "$redis_pid"
replayed_before="$(metric '^adbeacon_events_replayed_total$')"
t1="$(now_ms)"
export WRK_DELAY_MS="$DELAY_MS"
hist_snap "$tmp/hist-drain-0"
run_wrk drain "$app_url" "$DURATION"
drain_rps="$r_rps" drain_p50="$r_p50" drain_p99="$r_p99"
hist_snap "$tmp/hist-drain-1"
unset WRK_DELAY_MS
backlog_after_run="$(backlog)"
waited=0
while [ "$(backlog)" != 0 ]; do
  [ "$waited" -lt 3000 ] || die "the backlog did not drain within 300 s"
  sleep 0.1
  waited=$((waited + 1))
done
drain_ms=$(($(now_ms) - t1))
replayed=$(($(metric '^adbeacon_events_replayed_total$') - replayed_before))
replay_eps="$(awk -v n="$replayed" -v ms="$drain_ms" 'BEGIN { printf "%.0f", n * 1000 / ms }')"
if [ "$backlog_after_run" = 0 ]; then
  log "warning: the backlog drained before the measured run ended; the drain p99 covers some time without replay"
fi

log "---- after: the same paced load once the backlog is gone (same process, same data)"
export WRK_DELAY_MS="$DELAY_MS"
run_wrk after "$app_url" "$DURATION"
after_rps="$r_rps" after_p50="$r_p50" after_p99="$r_p99"
unset WRK_DELAY_MS

log "---- 4. accounting"
await_flush
accepted="$(metric '^adbeacon_events_accepted_total')"
stored="$(ch_query "SELECT count() FROM $db.events")"
distinct="$(ch_query "SELECT uniqExact(event_id) FROM $db.events")"
log "accepted $accepted, stored $stored, distinct $distinct"
if [ "$accepted" != "$stored" ] || [ "$stored" != "$distinct" ]; then
  log "!!!!! accepted $accepted, stored $stored, distinct event ids $distinct !!!!!"
  status=1
fi

ratio="$(awk -v a="$drain_p99" -v b="$normal_p99" 'BEGIN { printf "%.2f", a / b }')"
own_normal_p99="$(hist_p99 "$tmp/hist-normal-0" "$tmp/hist-normal-1")"
own_drain_p99="$(hist_p99 "$tmp/hist-drain-0" "$tmp/hist-drain-1")"
own_ratio="$(awk -v a="$own_drain_p99" -v b="$own_normal_p99" 'BEGIN { if (a > 0 && b > 0) printf "%.2fx", a / b; else print "not measured" }')"
own_ms() { if [ "${1:-0}" -gt 0 ] 2>/dev/null; then ms "$1"; else echo "n/a"; fi; }
ratio_after="$(awk -v a="$drain_p99" -v b="$after_p99" 'BEGIN { printf "%.2f", a / b }')"
spill_pct="$(awk -v a="$outage_rps" -v b="$sat_rps" 'BEGIN { printf "%.1f", 100 * a / b }')"
spill_verdict="$(awk -v p="$spill_pct" 'BEGIN { print (p >= 75 ? "PASS" : "BELOW") }')"
verdict="$(awk -v r="$ratio" -v t="$TARGET_RATIO" 'BEGIN { print (r <= t ? "PASS" : "ABOVE") }')"
rev="$(git_rev)"
when="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
{
  echo "<!-- scripts/bench-replay.sh, $when, rev $rev -->"
  echo "| phase | req/s | p50 | p99 | |"
  echo "|---|---:|---:|---:|---|"
  echo "| normal (paced) | $(rps_fmt "$normal_rps") | $(ms "$normal_p50") | $(ms "$normal_p99") | |"
  echo "| saturation, ClickHouse up | $(rps_fmt "$sat_rps") | | $(ms "$sat_p99") | |"
  echo "| outage (saturation, ClickHouse down) | $(rps_fmt "$outage_rps") | | $(ms "$outage_p99") | $outage_non2xx non-2xx; spilled $spilled events, $spill_eps events/s |"
  echo "| drain (paced, while $backlog_start events replay) | $(rps_fmt "$drain_rps") | $(ms "$drain_p50") | $(ms "$drain_p99") | replayed $replayed events in $((drain_ms / 1000)) s: $replay_eps events/s; $backlog_after_run left when the run ended |"
  echo "| after the drain (paced) | $(rps_fmt "$after_rps") | $(ms "$after_p50") | $(ms "$after_p99") | |"
  echo
  echo "Target: live p99 while the backlog drains <= ${TARGET_RATIO}x the p99 at rest: **$verdict** (${ratio}x; ${ratio_after}x the p99 after the drain)."
  echo "adbeacon's own p99 of POST /ads/click (http_request_duration_seconds, inside the service; linear within" \
    "its histogram bucket): $(own_ms "$own_normal_p99") at rest, $(own_ms "$own_drain_p99") during the drain (${own_ratio})." \
    "The rest of what wrk measures is spent outside adbeacon's handlers: hyper reading and writing, the kernel, and wrk's own core (where ClickHouse takes the replay's INSERTs on this machine)."
  if [ "$(kernel_preemption)" = none ]; then
    echo "This kernel does not preempt kernel work (Dynamic Preempt: none): ClickHouse writing the replayed parts keeps the" \
      "core it shares with wrk (or with adbeacon) for milliseconds at a time, SCHED_IDLE or not; see the README, What an outage costs."
  fi
  echo "Target: throughput while spilling >= 75 % of normal at saturation: **$spill_verdict** ($spill_pct %)."
  echo "Accounting: accepted $accepted, stored $stored, distinct event ids $distinct."
  echo "Load: wrk -t1 -c$CONNECTIONS POST /ads/click, WRK_DELAY_MS=$DELAY_MS (paced), $DURATION per phase; outage $OUTAGE at" \
    "saturation; REPLAY_RATE=${REPLAY_RATE:-200000 (default)}; $ncpu CPUs; pinning: $pinning."
} | tee "$out_dir/last-replay.md"
exit "$status"
