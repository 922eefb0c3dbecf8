#!/usr/bin/env bash
# `make bench-analytics`: how fast GET /ads/analytics answers over a realistic amount of data,
# next to the same numbers computed from the raw `events` table.
#
# One run: builds release, starts a private ClickHouse and adbeacon on free loopback ports, loads
# BENCH_EVENTS events (spread uniformly over the 35 days up to now, across BENCH_ADS ads with
# Zipf-like weights, the hottest ad taking ~30 %) with INSERT … SELECT on the server, then lets
# loadtest/analytics/bench.py time the endpoint per timeframe (1h, 24h, 7d, 30d, all), for the
# hottest ad and for the listing of all ads, against the raw-table SQL for the same windows, and
# check that both give the same counts. The report is printed and written to
# .data/bench/analytics.md.
#
# Settings (environment):
#   BENCH_EVENTS (10000000)   events to load
#   BENCH_ADS (20)            ads to spread them over
#   BENCH_MIX (video)         event kinds: `video`, a video campaign's traffic as loadtest/mixed.js
#                             sends it (impressions : progress beacons : clicks about 100 : 300 : 2,
#                             a 2 % CTR); `clicky`, 40 % impressions and 5 % clicks (a 12.5 % CTR,
#                             ten times the unique-click work: the worst case for the aggregates)
#   BENCH_CHUNK (1000000)     rows per INSERT (each goes through the materialized views whole)
#   BENCH_REQUESTS (500)      timed requests per timeframe and side (endpoint, raw SQL)
#   BENCH_WARMUP (20)         untimed requests before those
#   BENCH_BLOCK (10)          requests per side before the other side's turn (1: request by request,
#                             the method before 2026-11-23's evening; see loadtest/analytics/bench.py)
#   BENCH_KEEP (0)            1: after the report, keep both servers up for poking until Ctrl-C
#   BENCH_AT_REST (1)         1: before timing, merge every table's partitions of the months before
#                             the current one (OPTIMIZE … FINAL), as on a server that has run for a
#                             while; 0: time the tables as the load left them (see below)
#
# Exits non-zero when loading failed, the endpoint answered errors, or its counts differ from the
# raw table's. A missed latency target is reported, not an error. Never touches servers it did not
# start: `make run`'s stack, test servers and `make bench`'s servers are left alone.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
# Shared with bench.sh: log/die, our servers' start-up and clean-up; see its header.
# shellcheck source-path=SCRIPTDIR source=lib/bench-common.sh
. "$root/scripts/lib/bench-common.sh"
log_tag=bench-analytics # what log lines start with

EVENTS="${BENCH_EVENTS:-10000000}"
ADS="${BENCH_ADS:-20}"
CHUNK="${BENCH_CHUNK:-1000000}"
REQUESTS="${BENCH_REQUESTS:-500}"
WARMUP="${BENCH_WARMUP:-20}"
BLOCK="${BENCH_BLOCK:-10}"
KEEP="${BENCH_KEEP:-0}"
AT_REST="${BENCH_AT_REST:-1}"
MIX="${BENCH_MIX:-video}"
DB=bench_analytics
DAYS=35
# Zipf exponent: with 20 ads, 1.05 gives the hottest one 29.5 % of the events.
ZIPF_S=1.05

check_counts EVENTS ADS CHUNK REQUESTS BLOCK
[[ "$WARMUP" =~ ^[0-9]+$ ]] || die "BENCH_WARMUP must be a whole number, got '$WARMUP'"
[ "$ADS" -le 999 ] || die "BENCH_ADS must be at most 999, got $ADS"
[[ "$MIX" =~ ^(video|clicky)$ ]] || die "BENCH_MIX must be video or clicky, got '$MIX'"
[[ "$AT_REST" =~ ^[01]$ ]] || die "BENCH_AT_REST must be 0 or 1, got '$AT_REST'"

# ---------------------------------------------------------------- prerequisites
require_tools "run 'make bench-analytics', which installs what is missing" curl python3 clickhouse-server cargo

# ---------------------------------------------------------------- clean-up
out_dir="$root/.data/bench"
mkdir -p "$out_dir"
# ClickHouse's data (~1 GB for 10M events) lives here for the run only; the report stays.
tmp="$(mktemp -d "$out_dir/analytics-run.XXXXXX")"

# ch_pid, app_pid and watchdog_pid come from bench-common.sh (empty until started).

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local status=$?
  # Finish the clean-up even if Ctrl-C is pressed again.
  trap '' INT TERM HUP
  # adbeacon first, while its ClickHouse still answers; ClickHouse last.
  stop_pid adbeacon "$app_pid" 40
  stop_pid clickhouse-server "$ch_pid" 20
  stop_watchdog
  # Keep the logs of the last run for a look afterwards; ClickHouse's data goes.
  keep_logs "$out_dir/analytics-logs" "$tmp"/*.log
  rm -rf "$tmp"
  exit "$status"
}
set_traps cleanup
start_watchdog

# ---------------------------------------------------------------- build
build_release

# ---------------------------------------------------------------- ports
read -r ch_http ch_tcp app_port < <(free_ports 3)
app_url="http://127.0.0.1:$app_port"

# ---------------------------------------------------------------- ClickHouse
start_clickhouse "$ch_http" "$ch_tcp" # sets ch_url

ch_query() { # SQL [MAX_SECONDS] -> result on stdout; ClickHouse's error text on failure
  local out
  if ! out="$(curl -sS --noproxy '*' --max-time "${2:-60}" -w '\n%{http_code}' "$ch_url/?database=$DB" \
    --data-binary "$1" 2>&1)"; then
    log "ClickHouse query failed: $out"
    return 1
  fi
  if [ "${out##*$'\n'}" != 200 ]; then
    log "ClickHouse answered: ${out%$'\n'*}"
    return 1
  fi
  out="${out%$'\n'*}"
  [ -z "$out" ] || printf '%s\n' "$out"
}

# ---------------------------------------------------------------- adbeacon
log "starting adbeacon on $app_url (database $DB)"
start_adbeacon "$app_bin" "$app_port" "$DB"
wait_ready adbeacon "$app_pid" app_ready "$tmp/adbeacon.log"

# ---------------------------------------------------------------- data
# Ads b0000000-0000-4000-8000-000000000001 … (the number is the ad's popularity rank).
ad_id() { printf 'b0000000-0000-4000-8000-%012d' "$1"; }
hot_ad="$(ad_id 1)"

now="$(date -u +%s)"
ads_rows=""
for i in $(seq 1 "$ADS"); do
  ads_rows+="${ads_rows:+, }('$(ad_id "$i")', 'bench ad $i', 'https://cdn.example.com/bench/$i.mp4', "
  ads_rows+="'https://www.example.com/landing/$i', 1, toDateTime($now), toDateTime($now), 1)"
done
ch_query "INSERT INTO ads (id, name, video_url, target_url, active, created_at, updated_at, version) VALUES $ads_rows" ||
  die "could not insert the ads"

# multiIf(r < t1, v1, r < t2, v2, …, vn): picks a value by a uniform r in [0, 1e6). (Plain
# multiIf, not arrayFirstIndex with a lambda: ClickHouse 18.16 drops a subquery column that is
# used only inside a lambda.)
pick() { # R VALUE:WEIGHT... (weights as parts per million, adding up to 1e6)
  local r="$1" acc=0 sql="multiIf(" pair
  shift
  for pair in "$@"; do
    if [ "$#" -eq 1 ]; then
      sql+="${pair%:*})"
    else
      acc=$((acc + ${pair##*:}))
      sql+="$r < $acc, ${pair%:*}, "
    fi
    shift
  done
  printf '%s' "$sql"
}

# Ad weights 1/rank^s, as parts per million (the last ad takes the rounding).
mapfile -t ad_weights < <(python3 -c "
n, s = $ADS, $ZIPF_S
w = [k ** -s for k in range(1, n + 1)]
for x in w:
    print(round(x / sum(w) * 1e6))
")
ad_picks=()
for i in $(seq 1 "$ADS"); do ad_picks+=("'$(ad_id "$i")':${ad_weights[$((i - 1))]}"); done
ad_sql="toUUID($(pick r_ad "${ad_picks[@]}"))"
hot_pct="$(awk -v w="${ad_weights[0]}" 'BEGIN { printf "%.1f", w / 1e4 }')"

# Event kinds, parts per million (each mix adds up to 1e6).
case "$MIX" in
  video) # impressions 24.8 %, clicks 0.5 % (CTR 2 %), progress beacons the rest
    kind_sql="$(pick r_kind "'impression':248000" "'click':5000" "'creative_view':40000" "'start':200000" \
      "'first_quartile':150000" "'midpoint':120000" "'third_quartile':100000" "'complete':85000" \
      "'skip':25000" "'pause':10000" "'resume':9000" "'mute':4000" "'unmute':2000" "'close':1000" \
      "'error':1000")" ;;
  clicky) # impressions 40 %, clicks 5 % (CTR 12.5 %)
    kind_sql="$(pick r_kind "'impression':400000" "'click':50000" "'creative_view':20000" "'start':120000" \
      "'first_quartile':100000" "'midpoint':90000" "'third_quartile':80000" "'complete':70000" \
      "'skip':40000" "'pause':10000" "'resume':10000" "'mute':4000" "'unmute':3000" "'close':2000" \
      "'error':1000")" ;;
esac

# Traffic that does not count (3 %, parts per million) and VAST error codes (error events only):
# the endpoint reports both beside the net numbers, and bench.py checks them against the raw rows.
traffic_sql="$(pick r_traffic "'valid':970000" "'duplicate':10000" "'bot':15000" "'empty_user_agent':5000")"
code_sql="toUInt16($(pick r_code 400:300000 401:150000 402:200000 403:100000 405:150000 303:50000 900:50000))"

span=$((DAYS * 86400))
start=$((now - span))
chunks=$(((EVENTS + CHUNK - 1) / CHUNK))
log "loading $EVENTS events ($MIX mix) over the $DAYS days before $(date -u -d "@$now" +%FT%TZ) in $chunks INSERTs" \
  "($ADS ads, the hottest $hot_ad with $hot_pct %)"

# Each INSERT covers its own slice of time, in order (as live traffic arrives), so that the
# minute and hour aggregates of one chunk land in few parts; over all chunks the times are
# uniform. Its rows: ip_hash from 2 million client addresses, playback_time NULL for one in ten,
# received_at 0-4 s after event_time, 3 % of them filtered traffic, error events with a code.
load_start="$(date +%s.%N)"
done_rows=0
for c in $(seq 1 "$chunks"); do
  rows=$((c == chunks ? EVENTS - done_rows : CHUNK))
  t_from=$((start + span * done_rows / EVENTS))
  t_len=$((start + span * (done_rows + rows) / EVENTS - t_from))
  [ "$t_len" -ge 1 ] || t_len=1
  chunk_start="$(date +%s.%N)"
  ch_query "INSERT INTO events
      (event_id, ad_id, kind, event_time, received_at, ip_hash, playback_time, error_code, batch_id, traffic)
    SELECT
      generateUUIDv4(), $ad_sql, $kind_sql AS kind_v, toDateTime(t), toDateTime(t + r_misc % 5),
      intHash64(r_ip), if(r_misc % 10 = 0, NULL, toFloat32(r_misc % 30000 / 1000)),
      if(kind_v = 'error', $code_sql, toUInt16(0)), toUUID('b0000000-0000-4000-8000-ffffffffffff'),
      $traffic_sql
    FROM (
      SELECT rand(1) % 1000000 AS r_ad, rand(2) % 1000000 AS r_kind,
             toUInt32($t_from + rand(3) % $t_len) AS t, rand(4) % 2000000 AS r_ip, rand(5) AS r_misc,
             rand(6) % 1000000 AS r_traffic, rand(7) % 1000000 AS r_code
      FROM numbers($rows)
    )" 1800 || die "INSERT $c/$chunks failed"
  done_rows=$((done_rows + rows))
  log "  $c/$chunks: $rows rows in $(awk -v a="$chunk_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
done
load_s="$(awk -v a="$load_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
load_rate="$(awk -v n="$EVENTS" -v s="$load_s" 'BEGIN { printf "%.0f", n / s }')"
log "loaded $EVENTS events in $load_s s ($load_rate rows/s, materialized views included)"

stored="$(ch_query "SELECT count() FROM events")" || die "SELECT count() failed"
[ "$stored" = "$EVENTS" ] || die "events holds $stored rows, expected $EVENTS"

# Let the background merges of the load settle (up to 5 minutes), so that the timings are those
# of a table at rest, not of one being merged on the same two cores.
settle_start="$(date +%s)"
while :; do
  merging="$(ch_query "SELECT count() FROM system.merges WHERE database = '$DB'")" || merging=0
  [ "$merging" != 0 ] || break
  [ $(($(date +%s) - settle_start)) -lt 300 ] || {
    log "warning: $merging merges still running after 300 s; measuring anyway"
    break
  }
  sleep 1
done
log "merges settled after $(($(date +%s) - settle_start)) s"
# The load writes 35 days in well under a minute, so the previous month ends up in one part per
# INSERT that touched it, of similar sizes, and 18.16's merge selector leaves such parts alone for
# hours (it merges similar parts only once they are old). On a server that has run for a while, a month
# that no longer takes inserts has been merged: its parts were written over weeks, merged as they
# came, and merged again as they aged. Every query reads every part of its partitions (an index
# look-up and at least one granule each), so the two states time differently: 30 days of one ad
# from ad_counts took 6.5 ms (p50, sent directly) as the load left it (6 parts, the previous month
# in 4) and 5.4 ms with each month merged into one part. The current month is left as the load left it, as it would be live. Raw
# `events` gets the same treatment, so both sides of the comparison read merged months.
at_rest=no
if [ "$AT_REST" = 1 ]; then
  current="$(date -u +%Y%m)"
  past="database = '$DB' AND active AND match(partition, '^[0-9]{6}\$') AND partition < '$current'"
  old_parts="$(ch_query "SELECT DISTINCT table, partition FROM system.parts WHERE $past FORMAT TSV")" ||
    die "cannot list the partitions"
  while IFS=$'\t' read -r table partition; do
    [ -n "$table" ] || continue
    ch_query "OPTIMIZE TABLE $table PARTITION $partition FINAL" 1800 || die "OPTIMIZE $table $partition failed"
  done <<<"$old_parts"
  # OPTIMIZE answers 200 without merging when it cannot (a merge of those parts still running):
  # the report says so rather than claim merged months.
  unmerged="$(ch_query "SELECT count() FROM (SELECT table, partition FROM system.parts WHERE $past
    GROUP BY table, partition HAVING count() > 1)")" || die "cannot count the parts"
  at_rest=yes
  [ "$unmerged" = 0 ] || {
    at_rest="no, $unmerged table partitions left in several parts"
    log "warning: OPTIMIZE left $unmerged table partitions in several parts; measuring anyway"
  }
  log "merged the months before $current: $(printf '%s\n' "$old_parts" | grep -c . || true) table partitions"
fi
parts="$(ch_query "SELECT table, count() AS parts, sum(rows) AS rows, formatReadableSize(sum(bytes)) AS size
  FROM system.parts WHERE database = '$DB' AND active GROUP BY table ORDER BY table FORMAT PrettyCompactNoEscapes")" || parts=""
log "tables:"
printf '%s\n' "$parts" >&2

# ---------------------------------------------------------------- measure
rev="$(git_rev)"

bench_status=0
python3 loadtest/analytics/bench.py \
  --app "$app_url" --clickhouse "$ch_url" --database "$DB" --ad "$hot_ad" \
  --requests "$REQUESTS" --warmup "$WARMUP" --block "$BLOCK" --out "$out_dir/analytics.md" \
  --note "$EVENTS events over $DAYS days, $ADS ads (hottest: $hot_pct %), mix $MIX, months before the current one merged: $at_rest, loaded in $load_s s ($load_rate rows/s); rev $rev; nproc $(nproc), load avg $(cut -d' ' -f1-3 /proc/loadavg) before timing" ||
  bench_status=$?
log "wrote $out_dir/analytics.md; logs in $out_dir/analytics-logs/"

if [ "$KEEP" = 1 ]; then
  log "BENCH_KEEP=1: servers stay up until Ctrl-C:"
  log "  adbeacon   $app_url   e.g. curl '$app_url/ads/analytics?adId=$hot_ad&timeframe=30d'"
  log "  ClickHouse $ch_url/   e.g. echo 'SELECT count() FROM $DB.events' | curl --data-binary @- $ch_url/"
  while alive "$app_pid" && alive "$ch_pid"; do sleep 1; done
  log "a server exited"
fi
exit "$bench_status"
