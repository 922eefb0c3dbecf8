#!/usr/bin/env bash
# `make bench`: how fast `adbeacon serve` takes events, next to the cheapest server the same stack
# can build (examples/bare.rs, a bare hyper server with the same answers), and next to itself with
# a no-op sink (the pipeline's cost).
#
# One run builds release and starts, on free loopback ports, a private ClickHouse, adbeacon
# storing into it, adbeacon with the no-op sink (ADBEACON_BENCH_DISCARD_EVENTS=1: batches are
# confirmed and dropped) and bare. Then, with one wrk and the same connections for all:
#   1. saturation, per endpoint (BENCH_ENDPOINTS): POST /ads/click (loadtest/wrk/click.lua, the
#      old service's body), GET /t/impression and the other beacons (pixel.lua), POST /ads/events
#      with BENCH_BATCH_EVENTS events each (batch.lua), then the pixel and the batch again with a
#      fresh client event id on every event (pixel-ids, batch-ids: WRK_EVENT_IDS=1, as players and
#      SDKs send them; the service claims and remembers each); rounds alternate bare, adbeacon,
#      no-op; the best round of each counts. adbeacon's rows per INSERT and INSERTs per second and its
#      resident memory are read meanwhile;
#   2. half of adbeacon's click saturation, paced (WRK_DELAY_MS), against bare and adbeacon: p99 (the
#      lowest of BENCH_ROUNDS alternating rounds per target, the same rule for all);
#   3. overload: POST /ads/click at the usual connections (the steady state), then at 5x the
#      connections; adbeacon's highest resident memory in each;
# checks that every event adbeacon acknowledged reached ClickHouse exactly once and the no-op sink
# confirmed every one it acknowledged, and prints a table of throughput, p50, p99, ratios and CPU
# seconds per million events against the targets (also written to .data/bench/last-pinned.md or
# last-unpinned.md, by BENCH_PIN).
#
# Settings (environment):
#   BENCH_THREADS (1)  BENCH_CONNECTIONS (64)  BENCH_DURATION (10s)  BENCH_WARMUP (3s)
#   BENCH_ROUNDS (2)   measured runs per target and endpoint; the best one counts
#   BENCH_ENDPOINTS ("click pixel batch pixel-ids batch-ids")  BENCH_BATCH_EVENTS (100)  BENCH_OVERLOAD (5)
#   BENCH_WRK_RT (1)   pinned, wrk at SCHED_FIFO 50 in the paced runs where allowed (0: never; see pin_cores)
# adbeacon's own tuning variables (FLUSH_INTERVAL, BATCH_MAX_ROWS, ...; see `adbeacon --help`)
# pass through, e.g. `BATCH_MAX_ROWS=5000 scripts/bench.sh`.
#
# Exits non-zero when an event went missing or was stored twice, or adbeacon answered errors at
# saturation (503s under overload are its load shedding and reported, not failures). Never
# touches servers it did not start: `make run`'s stack on 8123, test servers and the like are
# left alone.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
# Shared with the other benchmarks: log/die, our servers' start-up and clean-up; see its header.
# shellcheck source-path=SCRIPTDIR source=lib/bench-common.sh
. "$root/scripts/lib/bench-common.sh"
log_tag=bench # what log lines start with

THREADS="${BENCH_THREADS:-1}"
CONNECTIONS="${BENCH_CONNECTIONS:-64}"
DURATION="${BENCH_DURATION:-10s}"
WARMUP="${BENCH_WARMUP:-3s}"
ROUNDS="${BENCH_ROUNDS:-2}"
ENDPOINTS="${BENCH_ENDPOINTS:-click pixel batch pixel-ids batch-ids}"
BATCH_EVENTS="${BENCH_BATCH_EVENTS:-100}"
OVERLOAD="${BENCH_OVERLOAD:-5}"
export WRK_BATCH_EVENTS="$BATCH_EVENTS"

check_counts THREADS CONNECTIONS ROUNDS BATCH_EVENTS OVERLOAD
for e in $ENDPOINTS; do
  case "$e" in
    click | pixel | batch | pixel-ids | batch-ids) ;;
    *) die "BENCH_ENDPOINTS names click, pixel, batch, pixel-ids and batch-ids; got '$e'" ;;
  esac
done
[[ "$DURATION" =~ ^[1-9][0-9]*s$ ]] || die "BENCH_DURATION must be whole seconds such as 10s, got '$DURATION'"
duration_s="${DURATION%s}"

# ---------------------------------------------------------------- prerequisites
command -v wrk >/dev/null 2>&1 || die "wrk not found; install it with 'apt-get install wrk' (or run 'make bench', which does)"
require_tools "run 'make bench' to install what is missing" curl python3 clickhouse-server cargo
clk_tck="$(getconf CLK_TCK)"

# ---------------------------------------------------------------- clean-up
tmp="$(mktemp -d "${TMPDIR:-/tmp}/adbeacon-bench.XXXXXX")"
out_dir="$root/.data/bench"
mkdir -p "$out_dir"

bare_pid="" noop_pid="" wrk_pid="" # ch_pid, app_pid and watchdog_pid come from bench-common.sh

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local status=$?
  # Finish the clean-up even if Ctrl-C is pressed again.
  trap '' INT TERM HUP
  stop_rss
  # adbeacon first, while its ClickHouse still answers, so its shutdown flush doesn't sit out
  # SHUTDOWN_TIMEOUT retrying; ClickHouse last (it may take a few seconds to stop).
  stop_pid wrk "$wrk_pid" 5
  stop_pid adbeacon "$app_pid" 40
  stop_pid "adbeacon (no-op sink)" "$noop_pid" 40
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
read -r ch_http ch_tcp app_port noop_port bare_port < <(free_ports 5)

# wrk and the server under test fight for CPU; on a machine with cores to spare, give wrk its own
# core so the server's numbers aren't wrk's. ClickHouse goes there too, at nice 19 (pin_others),
# and under SCHED_IDLE during the paced half-load runs (yield_others): in production it has
# machines of its own, and its INSERT bursts must not land on the core whose latency is measured,
# nor delay wrk's timing of the answers. BENCH_PIN=0 runs everything unpinned:
# servers and wrk share all cores, as a plain `wrk` against a server would; the report names
# which way a figure was taken.
declare -A target_pct
pin_cores
# The share of the bare server's throughput adbeacon must keep: POST /ads/click 80 % and the pixel
# 85 % per core (pinned); unpinned, the plain comparison, 70 % for both.
if [ -n "$wrk_cpu" ]; then
  pin_mode=pinned
  target_pct=([click]=80 [pixel]=85)
  pinning="adbeacon, its no-op twin and bare on cpu $srv_cpus; wrk ($wrk_rt_note), and ClickHouse at nice 19, its autogroup too (SCHED_IDLE during the half-load runs), on cpu $wrk_cpu (nproc=$ncpu)"
else
  pin_mode=unpinned
  target_pct=([click]=70 [pixel]=70)
  pinning="none (BENCH_PIN=${BENCH_PIN:-1}, nproc=$ncpu; servers, wrk and ClickHouse share all cores)"
fi
log "pinning: $pinning"

# ---------------------------------------------------------------- ClickHouse
# A private one, so the bench's inserts and its count() never mix with `make run`'s data.
start_clickhouse "$ch_http" "$ch_tcp"
pin_others "$ch_pid"

ch_query() { # SQL -> result on stdout
  curl -fsS --noproxy '*' --max-time 30 "$ch_url/" --data-binary "$1"
}

# ---------------------------------------------------------------- the three servers
log "starting adbeacon on 127.0.0.1:$app_port, its no-op twin on $noop_port, bare on $bare_port"
start_adbeacon "$app_bin" "$app_port" bench "${srv_pin[@]}"
app_real_pid="$app_pid"
# The no-op twin: the same binary and settings, its own database (catalog) and data directory.
instance=noop start_adbeacon "$app_bin" "$noop_port" bench_noop env ADBEACON_BENCH_DISCARD_EVENTS=1 "${srv_pin[@]}"
noop_pid="$app_pid" app_pid="$app_real_pid"
setsid env PORT="$bare_port" "${srv_pin[@]}" "$bare_bin" </dev/null >"$tmp/bare.log" 2>&1 &
bare_pid=$!
watch_pid "$bare_pid" "$bare_bin"

app_url="http://127.0.0.1:$app_port"
noop_url="http://127.0.0.1:$noop_port"
bare_url="http://127.0.0.1:$bare_port"
declare -A url=([bare]="$bare_url" [adbeacon]="$app_url" [noop]="$noop_url")
declare -A pid=([bare]="$bare_pid" [adbeacon]="$app_pid" [noop]="$noop_pid")

# Ready means migrated, demo ads seeded and ClickHouse reachable.
wait_ready adbeacon "$app_pid" app_ready "$tmp/adbeacon.log"
# shellcheck disable=SC2317  # called through wait_ready
noop_ready() { [ "$(http_code "$noop_url/readyz")" = 200 ]; }
wait_ready "adbeacon (no-op sink)" "$noop_pid" noop_ready "$tmp/noop.log"
# shellcheck disable=SC2317  # called through wait_ready
bare_ready() { [ "$(http_code -X POST "$bare_url/ads/click")" = 202 ]; }
wait_ready bare "$bare_pid" bare_ready "$tmp/bare.log"

# ---------------------------------------------------------------- the runs' helpers
# metric, cpu_ticks, await_flush, watch_rss and run_wrk come from bench-common.sh.

events_per_request() { case "$1" in batch*) echo "$BATCH_EVENTS" ;; *) echo 1 ;; esac; }

# Per adbeacon instance: events in 2xx answers wrk read, and how many more the server may have
# answered after wrk stopped reading (at most the connections' last requests of each run).
declare -A got_2xx=([adbeacon]=0 [noop]=0) unread_max=([adbeacon]=0 [noop]=0)
bad=() # runs with non-2xx answers or socket errors where none may be
# measure TARGET ENDPOINT LABEL [ALLOW_503]: one wrk run of DURATION; books its counts.
measure() {
  local target="$1" endpoint="$2" label="$3" n idle0 total0 idle1 total1
  # How much of the run the servers' core spent idle: a server short of 100 % of its core
  # was waiting for wrk (see docs/PERFORMANCE.md, "At saturation").
  r_idle=""
  [ -n "$srv_cpus" ] && read -r idle0 total0 < <(cpu_idle "$srv_cpus")
  # pixel-ids and batch-ids: pixel.lua and batch.lua with an id on every event.
  WRK_EVENT_IDS="$([[ "$endpoint" == *-ids ]] && echo 1 || echo 0)"
  export WRK_EVENT_IDS
  wrk_script="${endpoint%-ids}" run_wrk "$target-$endpoint-$label" "${url[$target]}" "${run_duration:-$DURATION}"
  if [ -n "$srv_cpus" ]; then
    read -r idle1 total1 < <(cpu_idle "$srv_cpus")
    r_idle="$(pct $((idle1 - idle0)) $((total1 - total0)))"
  fi
  [ "$target" = bare ] && return 0
  n="$(events_per_request "$endpoint")"
  got_2xx[$target]=$((got_2xx[$target] + (r_requests - r_non2xx) * n))
  unread_max[$target]=$((unread_max[$target] + CONNECTIONS * n))
  if { [ "$r_non2xx" != 0 ] && [ -z "${4:-}" ]; } || [ "$r_errors" != 0 ]; then
    bad+=("$target $endpoint $label: non2xx=$r_non2xx socket errors=$r_errors ($r_detail)")
    log "!!!!! $target $endpoint $label: $r_non2xx non-2xx answers, $r_errors socket errors ($r_detail) !!!!!"
  fi
}

# Keeps the best round (highest requests/s; its own p50 and p99 go with it).
better() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a > b) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f", 100 * a / b; else print "n/a" }'; }
per_m() { awk -v t="$1" -v hz="$clk_tck" -v n="$2" 'BEGIN { if (n > 0) printf "%.1f", t / hz / n * 1e6; else print "n/a" }'; }
ms() { awk -v us="$1" 'BEGIN { printf "%.2f ms", us / 1000 }'; }
num() { awk -v r="$1" 'BEGIN { printf "%.0f", r }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }

declare -A rps p50 p99 idle cpu_m cpu_req requests rows_per_insert inserts_per_s non2xx_sum
steady_rss=0 peak_rss=0
max_of() { awk -v a="$1" -v b="$2" 'BEGIN { print (b > a ? b : a) }'; }

# Before each measured phase: what the runs before it left behind is finished first, so it does
# not land in the next phase's rounds. ClickHouse's parts are written into the page cache and the
# kernel writes them back only once they are 30 s old (vm.dirty_expire_centisecs; the batch runs
# leave 600 to 800 MB): without a sync, that writeback, kernel work that is not preempted here,
# fell into the first half-load rounds of adbeacon and its twin (measured 2026-11-24: 644 MB dirty
# when they began, 20 MB a round later). That alone did not explain why adbeacon's first
# half-load round is its worse one (docs/PERFORMANCE.md). Merges under way are waited for too
# (at most 60 s).
settle() {
  local t0=$SECONDS dirty i=0
  dirty="$(awk '$1 == "Dirty:" { printf "%.0f MB", $2 / 1024 }' /proc/meminfo)"
  sync
  while [ "$(ch_query 'SELECT count() FROM system.merges' 2>/dev/null || echo 0)" != 0 ] && [ "$i" -lt 600 ]; do
    sleep 0.1
    i=$((i + 1))
  done
  log "settled: $dirty of dirty pages written back, merges done, in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- 1. saturation, per endpoint
log "load: wrk -t$THREADS -c$CONNECTIONS, warm-up $WARMUP, then $ROUNDS x $DURATION per target and endpoint; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for endpoint in $ENDPOINTS; do
  log "endpoint $endpoint"
  # Warm-up: connections, caches (the catalog's demo ads), allocator, CPU frequency.
  for target in adbeacon noop bare; do
    run_duration="$WARMUP" measure "$target" "$endpoint" warm-up
  done
  await_flush
  settle
  declare -A cpu0=([adbeacon]="$(cpu_ticks "$app_pid")" [noop]="$(cpu_ticks "$noop_pid")")
  declare -A split0=([bare]="$(cpu_split "$bare_pid")" [adbeacon]="$(cpu_split "$app_pid")" [noop]="$(cpu_split "$noop_pid")")
  declare -A acc0=([adbeacon]="$(metric_at "$app_url" '^adbeacon_events_accepted_total')" [noop]="$(metric_at "$noop_url" '^adbeacon_events_accepted_total')")
  rows0="$(metric '^adbeacon_batch_rows_sum$')" batches0="$(metric '^adbeacon_batch_rows_count$')"
  for target in bare adbeacon noop; do rps[$target:$endpoint]=0 requests[$target:$endpoint]=0; done
  # Alternating, so slow drifts of a shared machine hit every target alike.
  for round in $(seq 1 "$ROUNDS"); do
    for target in bare adbeacon noop; do
      [ "$target" = adbeacon ] && watch_rss "$app_pid" "$tmp/rss-steady"
      # The batch endpoint offers more events than ClickHouse takes on this machine's spare
      # core: the buffer fills and adbeacon sheds load with 503 (counted and reported).
      measure "$target" "$endpoint" "round$round" "$([[ "$endpoint" == batch* ]] && echo allow-503)"
      non2xx_sum[$target:$endpoint]=$((${non2xx_sum[$target:$endpoint]:-0} + r_non2xx))
      requests[$target:$endpoint]=$((${requests[$target:$endpoint]} + r_requests))
      if [ "$target" = adbeacon ]; then
        stop_rss
        peak_rss="$(max_of "$peak_rss" "$(cat "$tmp/rss-steady")")"
        if [ "$endpoint" = click ]; then steady_rss="$(max_of "$steady_rss" "$(cat "$tmp/rss-steady")")"; fi
      fi
      # Requests answered 2xx per second: a 503 stored nothing.
      ok_rps="$(awk -v r="$r_rps" -v n="$r_requests" -v bad="$r_non2xx" 'BEGIN { printf "%.1f", (n > 0 ? r * (n - bad) / n : 0) }')"
      if better "$ok_rps" "${rps[$target:$endpoint]}"; then
        rps[$target:$endpoint]="$ok_rps" p50[$target:$endpoint]="$r_p50" p99[$target:$endpoint]="$r_p99"
        idle[$target:$endpoint]="$r_idle"
      fi
    done
  done
  await_flush
  for target in adbeacon noop; do
    cpu_m[$target:$endpoint]="$(per_m $(($(cpu_ticks "${pid[$target]}") - cpu0[$target])) \
      $(($(metric_at "${url[$target]}" '^adbeacon_events_accepted_total') - acc0[$target])))"
  done
  # User and kernel CPU per request of each server over its rounds: where a server's time goes
  # next to bare's (both answer every request with one recvfrom and one writev). adbeacon's and the
  # no-op twin's include their background work (flushes) during the other servers' rounds.
  for target in bare adbeacon noop; do
    read -r u0 s0 <<<"${split0[$target]}"
    read -r u1 s1 < <(cpu_split "${pid[$target]}")
    cpu_req[$target:$endpoint]="$(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$clk_tck" -v n="${requests[$target:$endpoint]}" \
      'BEGIN { if (n > 0) printf "%.1f+%.1f", u / hz / n * 1e6, s / hz / n * 1e6; else print "n/a" }')"
  done
  rows=$(($(metric '^adbeacon_batch_rows_sum$') - rows0)) batches=$(($(metric '^adbeacon_batch_rows_count$') - batches0))
  rows_per_insert[$endpoint]="$(awk -v r="$rows" -v b="$batches" 'BEGIN { if (b > 0) printf "%.0f", r / b; else print 0 }')"
  inserts_per_s[$endpoint]="$(awk -v b="$batches" -v s=$((ROUNDS * duration_s)) 'BEGIN { printf "%.2f", b / s }')"
done

# ---------------------------------------------------------------- 2. half of saturation
half_delay="" half_note="skipped (BENCH_ENDPOINTS has no click)"
if [[ " $ENDPOINTS " == *" click "* ]]; then
  # Each connection waits CONNECTIONS*1000/(rate/2) ms after an answer; wrk paces in whole
  # milliseconds, so this is rounded down (at least 1) and the offered load is a little over half.
  half_delay="$(awk -v c="$CONNECTIONS" -v r="${rps[adbeacon:click]}" 'BEGIN { d = int(c * 1000 / (r / 2)); print (d < 1 ? 1 : d) }')"
  log "half of adbeacon's click saturation: WRK_DELAY_MS=$half_delay per connection"
  export WRK_DELAY_MS="$half_delay"
  # ClickHouse (taking adbeacon's INSERTs, or merging what the saturation runs stored) must not
  # hold wrk's core when wrk wakes up: SCHED_IDLE for these paced runs (see yield_others).
  settle
  yield_others "$ch_pid"
  # Alternating rounds as at saturation; each target keeps its round with the lowest p99 (the
  # same rule for bare as for adbeacon: one stall of the shared machine in one 10 s run decides a
  # single run's p99).
  for target in bare adbeacon noop; do p99[$target:half]=0; done
  for round in $(seq 1 "$ROUNDS"); do
    for target in bare adbeacon noop; do
      measure "$target" click "half-round$round"
      if [ "${p99[$target:half]}" = 0 ] || better "${p99[$target:half]}" "$r_p99"; then
        rps[$target:half]="$r_rps" p50[$target:half]="$r_p50" p99[$target:half]="$r_p99"
      fi
    done
  done
  unyield_others "$ch_pid"
  unset WRK_DELAY_MS
  half_note="WRK_DELAY_MS=$half_delay per connection"
fi

# ---------------------------------------------------------------- 3. overload
# The steady state that the overload's RSS is held against: the same click load at CONNECTIONS
# right before it, in the same process history. The runs in between (the pixel's, the batch's
# with its full buffer) leave the heap larger than the first click runs saw it: measured, 62 MiB
# in the first click runs, 73 MiB at the same load after the batch runs, 82 MiB at 5x the
# connections. That growth is not the overload's doing. The first click runs' RSS is reported
# next to it.
log "steady state before the overload: $CONNECTIONS connections on POST /ads/click"
watch_rss "$app_pid" "$tmp/rss-before"
measure adbeacon click before-overload
stop_rss
before_rss="$(cat "$tmp/rss-before")"
peak_rss="$(max_of "$peak_rss" "$before_rss")"
overload_connections=$((CONNECTIONS * OVERLOAD))
log "overload: $overload_connections connections on POST /ads/click"
watch_rss "$app_pid" "$tmp/rss-overload"
CONNECTIONS="$overload_connections" measure adbeacon click overload allow-503
stop_rss
overload_rss="$(cat "$tmp/rss-overload")"
peak_rss="$(max_of "$peak_rss" "$overload_rss")"
overload_rps="$r_rps" overload_p99="$r_p99" overload_non2xx="$r_non2xx"
buffer_cap_bytes="$(metric '^adbeacon_buffer_max_bytes$')"

# ---------------------------------------------------------------- the books
await_flush
declare -A accepted flushed
for target in adbeacon noop; do
  accepted[$target]="$(metric_at "${url[$target]}" '^adbeacon_events_accepted_total')" || die "$target's /metrics did not answer"
  flushed[$target]="$(metric_at "${url[$target]}" '^adbeacon_events_flushed_total')" || die "$target's /metrics did not answer"
done
dead_lettered="$(metric '^adbeacon_events_dead_lettered_total$')"
insert_failures="$(metric '^adbeacon_insert_failures_total')"
read -r stored distinct < <(ch_query 'SELECT count(), uniqExact(event_id) FROM bench.events FORMAT TSV') ||
  die "ClickHouse did not answer SELECT count()"
# ClickHouse's own throttling: with too many parts in a partition it delays INSERTs
# (parts_to_delay_insert, 150 on 18.16) and past parts_to_throw_insert refuses them. That would
# slow a batch run into ClickHouse that follows others still being merged; the report says
# whether it happened.
read -r ch_delayed ch_delayed_ms ch_refused < <(ch_query "SELECT sumIf(value, event = 'DelayedInserts'),
  sumIf(value, event = 'DelayedInsertsMilliseconds'), sumIf(value, event = 'RejectedInserts') FROM system.events FORMAT TSV") ||
  ch_delayed="n/a" ch_delayed_ms="n/a" ch_refused="n/a"
ch_parts="$(ch_query "SELECT count() FROM system.parts WHERE active AND database = 'bench' AND table = 'events' FORMAT TSV")" ||
  ch_parts="n/a"
lost=$((accepted[adbeacon] - distinct))
twice=$((stored - distinct))
noop_short=$((accepted[noop] - flushed[noop]))

# ---------------------------------------------------------------- report
rev="$(git_rev)"
when="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
verdict() { awk -v v="$1" -v t="$2" -v dir="${3:-ge}" 'BEGIN { if (v == "n/a") print "n/a"; else if (dir == "ge") print (v + 0 >= t ? "PASS" : "BELOW"); else print (v + 0 <= t ? "PASS" : "ABOVE") }'; }
declare -A name=([click]="POST /ads/click" [pixel]="GET /t/{event}" [batch]="POST /ads/events x$BATCH_EVENTS"
  [pixel-ids]="GET /t/{event}, eid" [batch-ids]="POST /ads/events x$BATCH_EVENTS, ids")
events_s() { awk -v r="$1" -v n="$(events_per_request "$2")" 'BEGIN { printf "%.0f", r * n }'; }

rows_md=() targets_md=()
{
  echo
  echo "adbeacon benchmark  $when  rev $rev  nproc $ncpu  load avg $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "load:    wrk -t$THREADS -c$CONNECTIONS -d$DURATION, best of $ROUNDS rounds (warm-up $WARMUP)"
  echo "pinning: $pinning"
  echo
  printf '%-28s %-9s %12s %12s %10s %10s %12s %14s %10s\n' endpoint target "2xx/s" "events/s" p50 p99 "CPU s/M ev" "CPU us/req u+s" "core idle"
  for endpoint in $ENDPOINTS; do
    for target in bare adbeacon noop; do
      k="$target:$endpoint"
      printf '%-28s %-9s %12s %12s %10s %10s %12s %14s %10s\n' "${name[$endpoint]}" "$target" "$(num "${rps[$k]}")" \
        "$(events_s "${rps[$k]}" "$endpoint")" "$(ms "${p50[$k]}")" "$(ms "${p99[$k]}")" "${cpu_m[$k]:-}" "${cpu_req[$k]:-}" \
        "${idle[$k]:+${idle[$k]} %}"
      rows_md+=("| ${name[$endpoint]} | $target | $(num "${rps[$k]}") | $(events_s "${rps[$k]}" "$endpoint") | $(ms "${p50[$k]}") | $(ms "${p99[$k]}") | ${cpu_m[$k]:-} | ${cpu_req[$k]:-} | ${idle[$k]:+${idle[$k]} %} |")
    done
    printf '%-28s adbeacon/bare %s %%, adbeacon/no-op %s %%; %s rows per INSERT, %s INSERTs/s\n' "" \
      "$(pct "${rps[adbeacon:$endpoint]}" "${rps[bare:$endpoint]}")" "$(pct "${rps[adbeacon:$endpoint]}" "${rps[noop:$endpoint]}")" \
      "${rows_per_insert[$endpoint]}" "${inserts_per_s[$endpoint]}"
  done
  if [ -n "$half_delay" ]; then
    for target in bare adbeacon noop; do
      printf '%-28s %-9s %12s %12s %10s %10s\n' "click at half saturation" "$target" "$(num "${rps[$target:half]}")" \
        "$(num "${rps[$target:half]}")" "$(ms "${p50[$target:half]}")" "$(ms "${p99[$target:half]}")"
      rows_md+=("| click at half of saturation ($half_note) | $target | $(num "${rps[$target:half]}") | $(num "${rps[$target:half]}") | $(ms "${p50[$target:half]}") | $(ms "${p99[$target:half]}") | | | |")
    done
  fi
  printf '%-28s %-9s %12s %12s %10s %10s\n' "click, ${OVERLOAD}x connections" adbeacon "$(num "$overload_rps")" "" "" "$(ms "$overload_p99")"
  rows_md+=("| click, ${OVERLOAD}× the connections ($overload_connections) | adbeacon | $(num "$overload_rps") | $(num "$overload_rps") | | $(ms "$overload_p99") | | | |")
  echo
  echo "targets:"
  target_line() { # TEXT VALUE VERDICT
    printf '  %-62s %-22s %s\n' "$1" "$2" "$3"
    targets_md+=("| $1 | $2 | $3 |")
  }
  for endpoint in click pixel pixel-ids; do
    [[ " $ENDPOINTS " == *" $endpoint "* ]] || continue
    v="$(pct "${rps[adbeacon:$endpoint]}" "${rps[bare:$endpoint]}")"
    t="${target_pct[${endpoint%-ids}]}"
    target_line "${name[$endpoint]} >= $t % of bare ($pin_mode)" "$v %" "$(verdict "$v" "$t")"
  done
  for endpoint in batch batch-ids; do
    [[ " $ENDPOINTS " == *" $endpoint "* ]] || continue
    with="${endpoint#batch}"
    v="$(events_s "${rps[adbeacon:$endpoint]}" "$endpoint")"
    target_line "batch endpoint${with:+ with ids} >= 1,000,000 events/s (into ClickHouse)" "$v" "$(verdict "$v" 1000000)"
    v="$(events_s "${rps[noop:$endpoint]}" "$endpoint")"
    target_line "batch endpoint${with:+ with ids} >= 1,000,000 events/s (no-op sink)" "$v" "$(verdict "$v" 1000000)"
  done
  for endpoint in $ENDPOINTS; do
    v="$(pct "${rps[adbeacon:$endpoint]}" "${rps[noop:$endpoint]}")"
    target_line "pipeline into ClickHouse >= 90 % of the no-op sink, $endpoint" "$v %" "$(verdict "$v" 90)"
  done
  if [ -n "$half_delay" ]; then
    v="$(ratio "${p99[adbeacon:half]}" "${p99[bare:half]}")"
    target_line "p99 at half of saturation <= 2x bare's at the same load" "${v}x" "$(verdict "$v" 2 le)"
  fi
  for endpoint in $ENDPOINTS; do
    v="${rows_per_insert[$endpoint]}"
    ok="$(awk -v r="$v" -v i="${inserts_per_s[$endpoint]}" 'BEGIN { print (r >= 10000 || i <= 1 ? "PASS" : "BELOW") }')"
    target_line ">= 10,000 rows per INSERT or <= 1 INSERT/s, $endpoint" "$v rows, ${inserts_per_s[$endpoint]}/s" "$ok"
  done
  v="$(ratio "$overload_rss" "$before_rss")"
  target_line "RSS at ${OVERLOAD}x overload <= 1.25x steady ($(mib "$before_rss") right before it, click; $(mib "$steady_rss") in the first click runs)" \
    "$(mib "$overload_rss"), ${v}x" "$(verdict "$v" 1.25 le)"
  # BUFFER_MAX_BYTES caps the events held; the process needs a little more (code, connections,
  # the batch being encoded). The deploy files give it a memory limit of twice the cap.
  v="$(ratio "$peak_rss" $((buffer_cap_bytes / 1024)))"
  target_line "peak RSS <= 2x BUFFER_MAX_BYTES ($(mib $((buffer_cap_bytes / 1024)))), the deploy limit" "$(mib "$peak_rss"), ${v}x" \
    "$(verdict "$v" 2 le)"
  echo
  echo "overload: $overload_non2xx non-2xx (503 is load shedding) of $(num "$overload_rps") requests/s"
  if [ "$(kernel_preemption)" = none ]; then
    echo "kernel:   no kernel preemption (Dynamic Preempt: none): ClickHouse's INSERTs and merges, working inside the kernel," \
      "hold wrk's core for milliseconds at a time, SCHED_IDLE or not: this shows in the p99s wrk reads, most for adbeacon, whose INSERTs it takes"
  fi
  for endpoint in batch batch-ids; do
    [[ " $ENDPOINTS " == *" $endpoint "* ]] || continue
    echo "$endpoint: adbeacon answered ${non2xx_sum[adbeacon:$endpoint]} batches 503 (ClickHouse behind, buffer full), the no-op sink ${non2xx_sum[noop:$endpoint]}"
  done
  echo "events:   adbeacon acknowledged ${accepted[adbeacon]} (wrk read ${got_2xx[adbeacon]} in 2xx answers);" \
    "ClickHouse holds $stored rows, $distinct distinct: lost=$lost twice=$twice"
  echo "          the no-op sink acknowledged ${accepted[noop]} and confirmed ${flushed[noop]}"
  echo "          ClickHouse's CPU is not in the CPU s/M ev column (pinned, it runs on wrk's core)"
  if [ -n "$srv_cpus" ]; then
    echo "          core idle: the servers' core (cpu $srv_cpus) idle in the best round; a server that saturates"
    echo "          keeps it near 0 %, so idle time there is time it waited for wrk (ClickHouse on wrk's core"
    echo "          holds wrk up; see docs/PERFORMANCE.md, \"At saturation\")"
  fi
  echo "clickhouse: $ch_delayed INSERTs delayed for too many parts ($ch_delayed_ms ms in all), $ch_refused refused;" \
    "$ch_parts active parts in bench.events at the end"
  if [ "$dead_lettered" != 0 ] || [ "$insert_failures" != 0 ]; then
    echo "flusher:  $insert_failures failed INSERTs, $dead_lettered events dead-lettered"
  fi
} >"$tmp/report.txt"
cat "$tmp/report.txt"

{
  echo "<!-- scripts/bench.sh, $when, rev $rev -->"
  echo "| endpoint | target | 2xx answers/s | events/s | p50 | p99 | CPU s per million events | CPU µs per request (user + kernel) | server core idle |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${rows_md[@]}"
  echo
  echo "| target | figure | verdict |"
  echo "|---|---|---|"
  printf '%s\n' "${targets_md[@]}"
  echo
  echo "Load: wrk -t$THREADS -c$CONNECTIONS -d$DURATION, best of $ROUNDS rounds; $ncpu CPUs; pinning: $pinning."
  echo "Events: ${accepted[adbeacon]} acknowledged, $distinct in ClickHouse ($stored rows), lost=$lost, twice=$twice."
  echo "ClickHouse: $ch_delayed INSERTs delayed for too many parts ($ch_delayed_ms ms in all), $ch_refused refused; $ch_parts active parts in bench.events at the end."
} >"$out_dir/last-$pin_mode.md"
log "wrote $out_dir/last-$pin_mode.md; logs and raw wrk output in $out_dir/last-logs/"

status=0
if [ "$lost" != 0 ] || [ "$twice" != 0 ]; then
  log "!!!!! adbeacon acknowledged ${accepted[adbeacon]} events; ClickHouse holds $distinct of them and $twice twice !!!!!"
  status=1
fi
if [ "$noop_short" != 0 ]; then
  log "!!!!! the no-op sink acknowledged ${accepted[noop]} events but confirmed ${flushed[noop]} !!!!!"
  status=1
fi
for target in adbeacon noop; do
  unread=$((accepted[$target] - got_2xx[$target]))
  if [ "$unread" -lt 0 ] || [ "$unread" -gt "${unread_max[$target]}" ]; then
    log "!!!!! $target: wrk's 2xx events (${got_2xx[$target]}) and the server's count (${accepted[$target]}) differ by more than in-flight requests can explain !!!!!"
    status=1
  fi
done
if [ "${#bad[@]}" -gt 0 ]; then
  log "!!!!! errors where none may be:"
  printf 'bench:   %s\n' "${bad[@]}" >&2
  status=1
fi
exit "$status"
