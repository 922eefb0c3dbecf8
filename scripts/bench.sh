#!/usr/bin/env bash
# `make bench`: how fast `adbeacon serve` takes clicks, next to the cheapest server the same stack
# can build (examples/bare.rs, a bare hyper server with the same 202 answer).
#
# One run: builds release, starts a private ClickHouse, adbeacon and bare on free loopback ports,
# drives both with the same wrk load (loadtest/wrk/click.lua), checks that every click adbeacon
# acknowledged reached ClickHouse, and prints a table (also written to
# .data/bench/last-pinned.md or last-unpinned.md, by BENCH_PIN).
#
# Settings (environment):
#   BENCH_THREADS (1)  BENCH_CONNECTIONS (64)  BENCH_DURATION (15s)  BENCH_WARMUP (3s)
#   BENCH_ROUNDS (2)   measured runs per target, alternating bare/adbeacon; the best one counts
# adbeacon's own tuning variables (FLUSH_INTERVAL, BATCH_MAX_ROWS, ...; see `adbeacon --help`)
# pass through, e.g. `BATCH_MAX_ROWS=5000 scripts/bench.sh`.
#
# Exits non-zero when an event went missing or adbeacon answered errors. Never touches servers it
# did not start: `make run`'s stack on 8123, test servers and the like are left alone.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
# Shared with bench-analytics.sh: log/die, our servers' start-up and clean-up; see its header.
# shellcheck source-path=SCRIPTDIR source=lib/bench-common.sh
. "$root/scripts/lib/bench-common.sh"
log_tag=bench # what log lines start with

THREADS="${BENCH_THREADS:-1}"
CONNECTIONS="${BENCH_CONNECTIONS:-64}"
DURATION="${BENCH_DURATION:-15s}"
WARMUP="${BENCH_WARMUP:-3s}"
ROUNDS="${BENCH_ROUNDS:-2}"
# The share of the bare server's throughput adbeacon must keep on POST /ads/click: 70 % for the
# plain (unpinned) comparison, 80 % per core (pinned), the later and stricter bar.
TARGET_PCT_UNPINNED=70
TARGET_PCT_PINNED=80

check_counts THREADS CONNECTIONS ROUNDS

# ---------------------------------------------------------------- prerequisites
command -v wrk >/dev/null 2>&1 || die "wrk not found; install it with 'apt-get install wrk' (or run 'make bench', which does)"
require_tools "run 'make bench' to install what is missing" curl python3 clickhouse-server cargo
clk_tck="$(getconf CLK_TCK)"

# ---------------------------------------------------------------- clean-up
tmp="$(mktemp -d "${TMPDIR:-/tmp}/adbeacon-bench.XXXXXX")"
out_dir="$root/.data/bench"
mkdir -p "$out_dir"

bare_pid="" wrk_pid="" # ch_pid, app_pid and watchdog_pid come from bench-common.sh

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local status=$?
  # Finish the clean-up even if Ctrl-C is pressed again.
  trap '' INT TERM HUP
  # adbeacon first, while its ClickHouse still answers, so its shutdown flush doesn't sit out
  # SHUTDOWN_TIMEOUT retrying; ClickHouse last (it may take a few seconds to stop).
  stop_pid wrk "$wrk_pid" 5
  stop_pid adbeacon "$app_pid" 40
  stop_pid bare "$bare_pid" 10
  stop_pid clickhouse-server "$ch_pid" 10
  stop_watchdog
  # Keep the logs of the last run for a look afterwards; the temp dir (ClickHouse data) goes.
  keep_logs "$out_dir/last-logs" "$tmp"/*.log "$tmp"/wrk-*.txt
  rm -rf "$tmp"
  exit "$status"
}
set_traps cleanup
start_watchdog

# ---------------------------------------------------------------- build
build_release --example bare
bare_bin="$root/target/release/examples/bare"

# ---------------------------------------------------------------- ports and pinning
read -r ch_http ch_tcp app_port bare_port < <(free_ports 4)

# wrk and the server under test fight for CPU; on a machine with cores to spare, give wrk its own
# core so the server's numbers aren't wrk's. ClickHouse stays unpinned: it only takes the
# flusher's batches, and the machine is shared anyway.
ncpu="$(nproc)"
wrk_pin=()
srv_pin=()
# BENCH_PIN=0 runs everything unpinned: servers and wrk share all cores, as a plain
# `wrk` against a server would; the report names which way a figure was taken.
pin_mode=pinned
TARGET_PCT=$TARGET_PCT_PINNED
TARGET_NAME="per core, pinned"
if [ "${BENCH_PIN:-1}" = "0" ]; then
  pin_mode=unpinned
  TARGET_PCT=$TARGET_PCT_UNPINNED
  TARGET_NAME="same load, unpinned"
  pinning="none (BENCH_PIN=0; servers, wrk and ClickHouse share all $ncpu cores)"
elif [ "$ncpu" -ge 2 ] && command -v taskset >/dev/null 2>&1; then
  srv_cpus=0
  if [ "$ncpu" -gt 2 ]; then srv_cpus="0-$((ncpu - 2))"; fi
  wrk_pin=(taskset -c "$((ncpu - 1))")
  srv_pin=(taskset -c "$srv_cpus")
  pinning="wrk on cpu $((ncpu - 1)); adbeacon and bare on cpu $srv_cpus; ClickHouse unpinned (nproc=$ncpu)"
elif [ "$ncpu" -lt 2 ]; then
  pin_mode=unpinned
  TARGET_PCT=$TARGET_PCT_UNPINNED
  TARGET_NAME="same load, unpinned"
  pinning="none (nproc=$ncpu)"
else
  pin_mode=unpinned
  TARGET_PCT=$TARGET_PCT_UNPINNED
  TARGET_NAME="same load, unpinned"
  pinning="none (taskset not found, nproc=$ncpu)"
fi
log "pinning: $pinning"

# ---------------------------------------------------------------- ClickHouse
# A private one, so the bench's inserts and its count() never mix with `make run`'s data.
start_clickhouse "$ch_http" "$ch_tcp"

ch_query() { # SQL -> result on stdout
  curl -fsS --noproxy '*' --max-time 30 "$ch_url/" --data-binary "$1"
}

# ---------------------------------------------------------------- the two servers
log "starting adbeacon on 127.0.0.1:$app_port"
start_adbeacon "$app_bin" "$app_port" bench "${srv_pin[@]}"

log "starting bare on 127.0.0.1:$bare_port"
setsid env PORT="$bare_port" "${srv_pin[@]}" "$bare_bin" </dev/null >"$tmp/bare.log" 2>&1 &
bare_pid=$!
watch_pid "$bare_pid" "$bare_bin"

app_url="http://127.0.0.1:$app_port"
bare_url="http://127.0.0.1:$bare_port"

# Ready means migrated, demo ads seeded and ClickHouse reachable: the first click is a 202.
wait_ready adbeacon "$app_pid" app_ready "$tmp/adbeacon.log"
# shellcheck disable=SC2317  # called through wait_ready
bare_ready() { [ "$(http_code -X POST "$bare_url/ads/click")" = 202 ]; }
wait_ready bare "$bare_pid" bare_ready "$tmp/bare.log"

# ---------------------------------------------------------------- the runs' helpers
# metric, cpu_ticks, await_flush and run_wrk come from bench-common.sh.

app_2xx=0 # 2xx answers wrk counted from adbeacon, every run including warm-up
app_bad=() # adbeacon runs with non-2xx answers or socket errors
app_run() { # DURATION LABEL
  run_wrk adbeacon "$app_url" "$1"
  app_2xx=$((app_2xx + r_requests - r_non2xx))
  if [ "$r_non2xx" != 0 ] || [ "$r_errors" != 0 ]; then
    app_bad+=("$2: non2xx=$r_non2xx socket errors=$r_errors ($r_detail)")
    log "!!!!! adbeacon $2 run: $r_non2xx non-2xx answers, $r_errors socket errors ($r_detail) !!!!!"
  fi
}

# Keeps the best round (highest requests/s; its own p50 and p99 go with it).
better() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a > b) }'; }
best_bare_rps=0 best_bare_p50=0 best_bare_p99=0
best_app_rps=0 best_app_p50=0 best_app_p99=0

# ---------------------------------------------------------------- the runs
log "load: wrk -t$THREADS -c$CONNECTIONS, warm-up $WARMUP, then $ROUNDS x $DURATION per target; load average: $(cut -d' ' -f1-3 /proc/loadavg)"

# Warm-up: connections, caches (the catalog's demo ads), allocator, CPU frequency. adbeacon goes
# first so bare's warm-up gives it time to flush before its CPU is sampled.
app_run "$WARMUP" warm-up
run_wrk bare "$bare_url" "$WARMUP"
await_flush

cpu_before="$(cpu_ticks "$app_pid")"
ch_cpu_before="$(cpu_ticks "$ch_pid")"
accepted_before="$(metric '^adbeacon_events_accepted_total')" || die "adbeacon's /metrics did not answer"

# Alternating, so slow drifts of a shared machine hit both targets alike.
for round in $(seq 1 "$ROUNDS"); do
  log "round $round/$ROUNDS"
  run_wrk bare "$bare_url" "$DURATION"
  if better "$r_rps" "$best_bare_rps"; then
    best_bare_rps="$r_rps" best_bare_p50="$r_p50" best_bare_p99="$r_p99"
  fi
  app_run "$DURATION" "round $round"
  if better "$r_rps" "$best_app_rps"; then
    best_app_rps="$r_rps" best_app_p50="$r_p50" best_app_p99="$r_p99"
  fi
done

# The books: every acknowledged click must be in ClickHouse once the flusher is done.
await_flush
cpu_after="$(cpu_ticks "$app_pid")"
ch_cpu_after="$(cpu_ticks "$ch_pid")"
accepted="$(metric '^adbeacon_events_accepted_total')" || die "adbeacon's /metrics did not answer"
dead_lettered="$(metric '^adbeacon_events_dead_lettered_total$')" || die "adbeacon's /metrics did not answer"
insert_failures="$(metric '^adbeacon_insert_failures_total')" || die "adbeacon's /metrics did not answer"
stored="$(ch_query 'SELECT count() FROM bench.events')" || die "ClickHouse did not answer SELECT count()"

# wrk stops with up to CONNECTIONS requests in flight per run: adbeacon accepts and answers them,
# wrk never reads the answers. So the server's own count of 2xx answers is the reference, and
# wrk's count may fall short of it by at most that much.
runs=$((ROUNDS + 1))
unread=$((accepted - app_2xx))
lost=$((accepted - stored))

measured=$((accepted - accepted_before))
cpu_s="$(awk -v t=$((cpu_after - cpu_before)) -v hz="$clk_tck" 'BEGIN { printf "%.2f", t / hz }')"
ch_cpu_s="$(awk -v t=$((ch_cpu_after - ch_cpu_before)) -v hz="$clk_tck" 'BEGIN { printf "%.2f", t / hz }')"
cpu_per_m="$(awk -v s="$cpu_s" -v n="$measured" 'BEGIN { if (n > 0) printf "%.1f", s / n * 1e6; else print "n/a" }')"

# ---------------------------------------------------------------- report
pct="$(awk -v a="$best_app_rps" -v b="$best_bare_rps" 'BEGIN { printf "%.1f", 100 * a / b }')"
p99x="$(awk -v a="$best_app_p99" -v b="$best_bare_p99" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')"
verdict="$(awk -v p="$pct" -v t="$TARGET_PCT" 'BEGIN { print (p >= t ? "PASS" : "BELOW") }')"
ms() { awk -v us="$1" 'BEGIN { printf "%.2f ms", us / 1000 }'; }
rps_fmt() { awk -v r="$1" 'BEGIN { printf "%.0f", r }'; }

rev="$(git_rev)"
when="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
load="wrk -t$THREADS -c$CONNECTIONS -d$DURATION, best of $ROUNDS rounds (warm-up $WARMUP), POST /ads/click"

{
  echo
  echo "adbeacon benchmark  $when  rev $rev  nproc $ncpu  load avg $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "load:    $load"
  echo "pinning: $pinning"
  echo
  printf '%-16s %12s %10s %10s\n' target "requests/s" p50 p99
  printf '%-16s %12s %10s %10s\n' bare "$(rps_fmt "$best_bare_rps")" "$(ms "$best_bare_p50")" "$(ms "$best_bare_p99")"
  printf '%-16s %12s %10s %10s\n' adbeacon "$(rps_fmt "$best_app_rps")" "$(ms "$best_app_p50")" "$(ms "$best_app_p99")"
  printf '%-16s %12s %10s %10s\n' adbeacon/bare "$pct %" "" "${p99x}x"
  echo
  echo "target: adbeacon >= ${TARGET_PCT}% of bare ($TARGET_NAME): $verdict ($pct %)"
  echo "events: wrk counted $app_2xx 2xx from adbeacon in $runs runs; adbeacon accepted $accepted" \
    "($unread answered after wrk stopped reading, at most $((runs * CONNECTIONS))); ClickHouse holds $stored; lost=$lost"
  echo "cpu:    adbeacon used $cpu_s s for $measured events in the measured runs = $cpu_per_m CPU s per million events"
  # Unpinned, so it competes with adbeacon (and wrk) for the same cores while storing the clicks.
  echo "        ClickHouse used $ch_cpu_s CPU s in the same window, storing them"
  if [ "$dead_lettered" != 0 ] || [ "$insert_failures" != 0 ]; then
    echo "flusher: $insert_failures failed INSERTs, $dead_lettered events dead-lettered"
  fi
} | tee "$tmp/report.txt"

{
  echo "<!-- scripts/bench.sh, $when, rev $rev -->"
  echo "| target | requests/s | p50 | p99 |"
  echo "|---|---:|---:|---:|"
  echo "| bare (hyper) | $(rps_fmt "$best_bare_rps") | $(ms "$best_bare_p50") | $(ms "$best_bare_p99") |"
  echo "| adbeacon | $(rps_fmt "$best_app_rps") | $(ms "$best_app_p50") | $(ms "$best_app_p99") |"
  echo "| adbeacon / bare | $pct % | | ${p99x}× |"
  echo
  echo "Target: adbeacon >= ${TARGET_PCT}% of bare ($TARGET_NAME): **$verdict**."
  echo "Load: $load; $ncpu CPUs; pinning: $pinning."
  echo "Events: $accepted acknowledged, $stored in ClickHouse, lost=$lost."
  echo "CPU: $cpu_per_m CPU s per million events."
} >"$out_dir/last-$pin_mode.md"
log "wrote $out_dir/last-$pin_mode.md; logs and raw wrk output in $out_dir/last-logs/"

status=0
if [ "$lost" != 0 ]; then
  log "!!!!! lost=$lost: adbeacon acknowledged $accepted clicks but ClickHouse holds $stored !!!!!"
  status=1
fi
if [ "$unread" -lt 0 ] || [ "$unread" -gt $((runs * CONNECTIONS)) ]; then
  log "!!!!! wrk's 2xx count ($app_2xx) and adbeacon's ($accepted) differ by more than in-flight requests can explain !!!!!"
  status=1
fi
if [ "${#app_bad[@]}" -gt 0 ]; then
  log "!!!!! adbeacon answered errors:"
  printf 'bench:   %s\n' "${app_bad[@]}" >&2
  status=1
fi
exit "$status"
