# shellcheck shell=bash
# The machinery that scripts/bench.sh (`make bench`) and scripts/bench-analytics.sh
# (`make bench-analytics`) share; both source this file after they cd to the repository root
# (the paths below are relative to it). It provides: log and die, the checks of the settings and
# tools, stopping our own children with grace, a SIGKILL watchdog for when the clean-up trap
# cannot run, keeping the run's logs, free loopback ports, a private ClickHouse rendered from
# clickhouse/local/, adbeacon started against it, the start-up waits, the wrk runs and reading
# adbeacon's metrics and CPU time (for bench.sh and bench-modes.sh), and the revision string.
#
# Each script keeps its own cleanup function (it alone knows what it started and in which order
# to stop it) and hands it to set_traps. Shared state is plain globals:
#   the script sets  log_tag (what log lines start with), tmp (this run's private directory,
#                    removed at the end) and app_url (adbeacon's base URL, for app_ready);
#   this file sets   ch_pid, app_pid, watchdog_pid (empty until started, so that the clean-up
#                    can name them at any point), ch_dir and ch_url (by start_clickhouse).
# Sourcing also extends PATH; nothing else runs until a function is called.

# Debian puts clickhouse-server in /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

ch_pid="" app_pid="" watchdog_pid=""
# run_wrk's pinning (a taskset command, or nothing); the scripts set it after sourcing.
wrk_pin=()

# Progress and errors go to stderr, so that stdout carries only the report.
log() { echo "${log_tag:?}: $*" >&2; }

# Stops the benchmark; the EXIT trap then stops whatever was started.
die() {
  log "error: $*"
  exit 1
}

# check_counts NAME...: each $NAME (set from BENCH_NAME) must be a whole number >= 1.
check_counts() {
  local v
  for v in "$@"; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "BENCH_$v must be a whole number >= 1, got '${!v}'"
  done
}

# require_tools HINT TOOL...: stops at once, with HINT on installing, not half-way through a run.
require_tools() {
  local hint="$1" tool
  shift
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found ($hint)"
  done
}

# True while PID runs and is not a zombie: our unreaped children are, and kill -0 passes on those.
alive() {
  local state
  [ -r "/proc/$1/stat" ] || return 1
  state="$(sed -E 's/^[0-9]+ \(.*\) (.).*/\1/' "/proc/$1/stat" 2>/dev/null)" || return 1
  [ "$state" != Z ]
}

# SIGTERM, TIMEOUT s of grace, SIGKILL; only for our unreaped children, so no pid can be recycled.
stop_pid() { # NAME PID TIMEOUT
  local name="$1" pid="$2" timeout="$3" waited=0
  [ -n "$pid" ] || return 0
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid"; do
      if [ "$waited" -ge $((timeout * 10)) ]; then
        log "$name (pid $pid) ignored SIGTERM for ${timeout}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.1
      waited=$((waited + 1))
    done
  fi
  wait "$pid" 2>/dev/null || true
}

# set_traps CLEANUP: signals exit 128+N, so CLEANUP runs once, from EXIT, however the run ends.
set_traps() {
  # shellcheck disable=SC2064  # the function name is meant to be expanded now
  trap "$1" EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  trap 'exit 129' HUP
}

# Our servers run in sessions of their own and would outlive a SIGKILLed script (CI timeout, OOM).
start_watchdog() {
  : >"${tmp:?}/pids"
  # Once this shell is gone, SIGKILL those listed in $tmp/pids (see watch_pid), checking each
  # command line so that a recycled pid is never hit. The clean-up stops it with SIGTERM.
  (
    trap 'exit 0' TERM
    while kill -0 $$ 2>/dev/null; do sleep 1; done
    while read -r pid name; do
      if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$name"; then
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done <"$tmp/pids"
    rm -rf "$tmp"
  ) </dev/null >/dev/null 2>&1 &
  watchdog_pid=$!
}

# watch_pid PID NAME: hands PID to the watchdog; NAME must occur in its command line.
watch_pid() { echo "$1 $2" >>"$tmp/pids"; }

# Called by the clean-up once our children are stopped: the watchdog has nothing left to guard.
stop_watchdog() {
  [ -n "$watchdog_pid" ] || return 0
  kill -TERM "$watchdog_pid" 2>/dev/null || true
  wait "$watchdog_pid" 2>/dev/null || true
}

# keep_logs DEST FILE...: the run's logs (ClickHouse's too) stay for a look once $tmp is gone.
keep_logs() {
  local dest="$1" f name
  shift
  rm -rf "$dest"
  mkdir -p "$dest"
  cp "$@" "$dest/" 2>/dev/null || true
  for f in "$tmp"/clickhouse/log/*.log; do
    [ -f "$f" ] || continue
    name="$(basename "$f")"
    [[ "$name" == clickhouse* ]] || name="clickhouse-$name" # stdout.log
    cp "$f" "$dest/$name" 2>/dev/null || true
  done
}

# free_ports N: N free loopback ports, not fixed numbers that a developer's stack may hold.
free_ports() {
  # Bound together, so they are distinct. Another program could take one before we bind it;
  # start-up would then fail loudly, not touch that program.
  python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
' "$1"
}

# Escapes a value for the right-hand side of a sed s|…|…| command.
sed_escape() { printf '%s' "$1" | sed -e 's/[\\|&]/\\&/g'; }

# start_clickhouse HTTP_PORT TCP_PORT: a private server in $tmp/clickhouse; returns once it answers.
start_clickhouse() {
  local http="$1" tcp="$2"
  ch_dir="$tmp/clickhouse"
  ch_url="http://127.0.0.1:$http"
  mkdir -p "$ch_dir/log" "$ch_dir/data" "$ch_dir/tmp" "$ch_dir/user_files" "$ch_dir/format_schemas"
  sed -e "s|@HTTP_PORT@|$http|g" -e "s|@TCP_PORT@|$tcp|g" -e "s|@DIR@|$(sed_escape "$ch_dir")|g" \
    clickhouse/local/config.xml >"$ch_dir/config.xml"
  # config.xml names users.xml relatively, so it sits next to it.
  cp clickhouse/local/users.xml "$ch_dir/users.xml"

  log "starting ClickHouse on 127.0.0.1:$http (tcp $tcp) in $ch_dir"
  # setsid: Ctrl-C reaches only the script, whose trap then stops everything in order.
  (cd "$ch_dir" && exec setsid clickhouse-server --config-file="$ch_dir/config.xml") \
    </dev/null >"$ch_dir/log/stdout.log" 2>&1 &
  ch_pid=$!
  watch_pid "$ch_pid" clickhouse-server
  wait_ready ClickHouse "$ch_pid" ch_ping "$ch_dir/log/stdout.log" "$ch_dir/log/clickhouse-server.err.log"
}

# start_adbeacon BIN PORT DATABASE [PREFIX...]: `PREFIX... BIN serve` against our ClickHouse,
# logging to $tmp/NAME.log with its data in $tmp/NAME-data, where NAME is $instance (adbeacon
# unless the caller runs more than one).
start_adbeacon() {
  local bin="$1" port="$2" db="$3" name="${instance:-adbeacon}"
  shift 3
  # setsid as for ClickHouse. Other adbeacon settings (FLUSH_INTERVAL, BATCH_MAX_ROWS, ...) pass
  # through from the caller's environment, for experiments; credentials meant for another
  # ClickHouse do not, and the demo ads must be seeded or every click would be a 404. adbeacon
  # creates DATABASE and runs its migrations at start-up.
  # No Redis unless the caller names one (REDIS_URL): never the spill of a `make run` stack on
  # 6379, whose replayer would carry benchmark events into its ClickHouse.
  # The load comes from one address, far over any sane per-client limit: the limit is set out of
  # reach, so the limiter still runs on every request (its cost is measured) but never refuses.
  setsid env -u CLICKHOUSE_USER -u CLICKHOUSE_PASSWORD SEED_DEMO_ADS=true REDIS_URL="${REDIS_URL:-none}" \
    RATE_LIMIT="${RATE_LIMIT:-1000000000}" RATE_LIMIT_BURST="${RATE_LIMIT_BURST:-1000000000}" \
    PORT="$port" HOST=127.0.0.1 CLICKHOUSE_URL="$ch_url" \
    CLICKHOUSE_DATABASE="$db" DATA_DIR="$tmp/$name-data" LOG_FORMAT=json LOG_LEVEL=warn \
    "$@" "$bin" serve </dev/null >"$tmp/$name.log" 2>&1 &
  app_pid=$!
  watch_pid "$app_pid" "$bin"
}

# show_tail FILE...: the end of each non-empty log, so a failed start-up explains itself.
show_tail() {
  local f
  for f in "$@"; do
    [ -s "$f" ] || continue
    echo "---- $f (last lines) ----" >&2
    tail -n 25 "$f" >&2
  done
}

# wait_ready NAME PID CHECK LOG...: polls CHECK for 60 s; dies, showing LOG, if PID exits first.
wait_ready() {
  local name=$1 pid=$2 check=$3 waited=0
  shift 3
  until "$check"; do
    if ! alive "$pid"; then
      show_tail "$@"
      die "$name exited during start-up"
    fi
    [ "$waited" -lt 600 ] || {
      show_tail "$@"
      die "$name was not ready within 60s"
    }
    sleep 0.1
    waited=$((waited + 1))
  done
}

# http_code CURL_ARGS...: the HTTP status alone (000 while nothing listens), for start-up probes.
http_code() { curl -s --noproxy '*' --max-time 2 -o /dev/null -w '%{http_code}' "$@" 2>/dev/null || true; }

# A wait_ready check: ClickHouse's /ping says "Ok." once it takes queries.
# shellcheck disable=SC2317  # called through wait_ready
ch_ping() { [ "$(curl -s --noproxy '*' --max-time 2 "$ch_url/ping" 2>/dev/null)" = "Ok." ]; }

# A wait_ready check: /readyz is 200 once adbeacon migrated, seeded demo ads and reaches ClickHouse.
# shellcheck disable=SC2317  # called through wait_ready
app_ready() { [ "$(http_code "${app_url:?}/readyz")" = 200 ]; }

# pin_cores: where BENCH_PIN is not 0, the machine has two or more cores and taskset exists, wrk
# goes on the last core (wrk_pin, wrk_cpu) and the server on the others (srv_pin, srv_cpus);
# otherwise all of them are empty. Sets ncpu, and wrk_rt and wrk_rt_note, either way.
#
# Pinned, the paced runs (WRK_DELAY_MS, where latency is timed) run wrk at a real-time priority
# (wrk_rt: SCHED_FIFO 50) where the system allows it. The servers timed share nothing with wrk,
# but ClickHouse (and Redis) do, on its core, and even at SCHED_IDLE a ClickHouse INSERT kept
# wrk from running for up to 5 ms after it was woken (docs/PERFORMANCE.md, "At saturation").
# Measured on an ad-hoc rig at half load: adbeacon's p99 3.5 ms with wrk at SCHED_OTHER, 2.1
# and 1.2 ms at SCHED_FIFO; bare's 0.50 and 0.42 to 0.50 ms. Every server is timed by the same
# wrk, so this favours none. Not at saturation: there wrk is busy all the time against bare, and
# the kernel's real-time throttling (it keeps 5 % of each second from real-time tasks) would stall
# it for 50 ms a second, against bare alone (measured: bare 132,383 and 133,044 against 136,390 and
# 136,827 requests/s, its p99 30 ms).
pin_cores() {
  ncpu="$(nproc)"
  wrk_pin=() srv_pin=() wrk_cpu="" srv_cpus="" wrk_rt=() wrk_rt_note="wrk at SCHED_OTHER"
  if [ "${BENCH_PIN:-1}" != 0 ] && [ "$ncpu" -ge 2 ] && command -v taskset >/dev/null 2>&1; then
    srv_cpus=0
    if [ "$ncpu" -gt 2 ]; then srv_cpus="0-$((ncpu - 2))"; fi
    wrk_cpu=$((ncpu - 1))
    wrk_pin=(taskset -c "$wrk_cpu")
    if [ "${BENCH_WRK_RT:-1}" != 0 ] && chrt -f 50 true 2>/dev/null; then
      wrk_rt=(chrt -f 50)
      wrk_rt_note="wrk at SCHED_FIFO 50 in the paced runs"
    fi
    # shellcheck disable=SC2034  # read by the scripts
    srv_pin=(taskset -c "$srv_cpus")
  fi
}

# pin_others PID: where pin_cores pinned, moves a server's threads (and so those they start later) to $wrk_cpu, at
# the lowest priority: in production ClickHouse and Redis run on machines of their own; here they
# share a core with wrk, and must not delay wrk's own timing of adbeacon's answers.
#
# The lowest priority takes two settings where the kernel groups tasks by session (autogroups,
# /proc/sys/kernel/sched_autogroup_enabled, on in Debian's kernels). The servers start under setsid,
# so each is a group of its own, and a thread's nice value (or SCHED_IDLE) orders it only against
# the threads of its group: against wrk's group, ClickHouse's counted as much as wrk itself. Its
# INSERTs then held wrk's core for milliseconds at a time, and adbeacon's core sat idle waiting
# for wrk: 8.6 % idle and 99,000 to 102,000 clicks/s into ClickHouse, against 1.2 % and 109,000
# to 111,000 with the group's own nice at 19 (8 s runs, 3 alternating rounds, 2026-11-25).
pin_others() {
  local tid
  [ -n "$wrk_cpu" ] || return 0
  taskset -a -p -c "$wrk_cpu" "$1" >/dev/null
  for tid in /proc/"$1"/task/*; do renice -n 19 -p "${tid##*/}" >/dev/null 2>&1 || true; done
  # Raising a group's nice needs no privilege; the file is absent without autogroups.
  if [ -w /proc/"$1"/autogroup ]; then echo 19 >/proc/"$1"/autogroup 2>/dev/null || true; fi
}

# yield_others PID...: where pin_cores pinned, puts those servers' threads (and the threads they
# start later) under SCHED_IDLE, for runs that time a paced load. At nice 19 alone, a server that
# is busy on wrk's core (ClickHouse taking a replay's INSERTs) keeps the core until its time slice
# ends when wrk wakes up (EEVDF, Linux 6.6 and later), and wrk then reads up to a few ms of
# latency that is not adbeacon's; a SCHED_IDLE thread gives the core up at once. Not for runs at
# saturation, where SCHED_IDLE starves ClickHouse: unyield_others puts them back under
# SCHED_OTHER (still at nice 19, on wrk's core).
yield_others() { others_policy -i SCHED_IDLE "$@"; }
unyield_others() { others_policy -o SCHED_OTHER "$@"; }

# others_policy FLAG NAME PID...: chrt FLAG (priority 0) on every thread of each PID. Only as root:
# leaving SCHED_IDLE again needs the privilege (CAP_SYS_NICE), and a ClickHouse left idle would
# starve in the saturation runs that follow. A thread that ends while chrt walks the list makes it
# fail; that is worth a line, not the run.
others_policy() {
  local flag="$1" name="$2" pid
  shift 2
  [ -n "$wrk_cpu" ] && [ "$(id -u)" = 0 ] || return 0
  for pid in "$@"; do
    [ -n "$pid" ] || continue
    chrt -a "$flag" -p 0 "$pid" >/dev/null 2>&1 || log "warning: could not put every thread of pid $pid under $name"
  done
}

# The runs' helpers below use app_url, app_pid, tmp, wrk_pin, THREADS and CONNECTIONS, and set
# wrk_pid while wrk runs (for the clean-up).

# One value from adbeacon's /metrics (sum over the series matching PATTERN, 0 when absent).
metric() { # PATTERN
  metric_at "$app_url" "$1"
}

# The same from the adbeacon at URL.
metric_at() { # URL PATTERN
  curl -fsS --noproxy '*' --max-time 5 "$1/metrics" |
    awk -v pat="$2" '$0 !~ /^#/ && $1 ~ pat { s += $2 } END { printf "%d\n", s }'
}

# Resident memory of PID in KiB (0 once it is gone).
rss_kib() { # PID
  awk '/^VmRSS:/ { print $2; found = 1 } END { if (!found) print 0 }' "/proc/$1/status" 2>/dev/null || echo 0
}

# Samples PID's resident memory every 100 ms in the background and keeps the highest in FILE,
# until stop_rss; sets rss_pid.
rss_pid=""
watch_rss() { # PID FILE
  local pid="$1" file="$2"
  echo 0 >"$file"
  (
    max=0
    while alive "$pid"; do
      now="$(rss_kib "$pid")"
      if [ "$now" -gt "$max" ]; then
        max="$now"
        echo "$max" >"$file"
      fi
      sleep 0.1
    done
  ) &
  rss_pid=$!
}
stop_rss() {
  if [ -n "$rss_pid" ]; then
    kill "$rss_pid" 2>/dev/null || true
    wait "$rss_pid" 2>/dev/null || true
    rss_pid=""
  fi
}

# utime + stime of PID in clock ticks.
cpu_ticks() { # PID
  local user sys
  read -r user sys < <(cpu_split "$1")
  echo $((user + sys))
}

# utime and stime of PID in clock ticks, space-separated. Fields counted after the last ')'
# since comm may hold spaces.
cpu_split() { # PID
  local stat
  stat="$(cat "/proc/$1/stat")"
  stat="${stat##*) }"
  # shellcheck disable=SC2086  # word splitting into fields is the point
  set -- $stat
  echo "${12} ${13}"
}

# cpu_idle CPUS: idle (with iowait) and total clock ticks, space-separated, summed over the CPUs
# of a taskset list such as 0 or 0-2 (from /proc/stat).
cpu_idle() { # CPUS
  awk -v spec="$1" '
    BEGIN { n = split(spec, parts, ","); for (i = 1; i <= n; i++) { m = split(parts[i], r, "-"); for (c = r[1]; c <= (m > 1 ? r[2] : r[1]); c++) want["cpu" c] = 1 } }
    $1 in want { for (f = 2; f <= 9; f++) total += $f; idle += $5 + $6 }
    END { print idle + 0, total + 0 }' /proc/stat
}

# Waits until adbeacon holds no event (all confirmed by ClickHouse), up to 30 s.
await_flush() {
  local i=0 held
  sleep 2 # FLUSH_INTERVAL is 1s: the last batch is due within it
  while held="$(metric '^adbeacon_buffer_events$')" && [ "$held" != 0 ]; do
    [ "$i" -lt 300 ] || {
      log "warning: adbeacon still holds $held events after 30s"
      return 0
    }
    sleep 0.1
    i=$((i + 1))
  done
}

# Runs wrk once; sets r_rps r_p50 r_p99 r_requests r_non2xx r_errors and r_detail.
# The load is THREADS and CONNECTIONS of loadtest/wrk/$wrk_script.lua (click unless set), wrk
# pinned by the wrk_pin array; WRK_DELAY_MS (exported, for the script), when set, paces each
# connection.
run_no=0
run_wrk() { # LABEL URL DURATION
  local label="$1" url="$2" duration="$3" file line
  run_no=$((run_no + 1))
  file="$tmp/wrk-$(printf '%02d' "$run_no")-$label.txt"
  # In the background with `wait`, so a signal runs the trap at once instead of after the run,
  # and the trap (or the watchdog) can stop wrk too.
  local rt=()
  if [ -n "${WRK_DELAY_MS:-}" ]; then rt=("${wrk_rt[@]}"); fi
  "${rt[@]}" "${wrk_pin[@]}" wrk --latency -t "$THREADS" -c "$CONNECTIONS" -d "$duration" \
    -s "loadtest/wrk/${wrk_script:-click}.lua" "$url" </dev/null >"$file" 2>&1 &
  wrk_pid=$!
  watch_pid "$wrk_pid" wrk
  if ! wait "$wrk_pid"; then
    wrk_pid=""
    cat "$file" >&2
    die "wrk failed against $label ($url)"
  fi
  wrk_pid=""
  line="$(grep '^RESULT ' "$file" | tail -n 1)" || {
    cat "$file" >&2
    die "wrk printed no RESULT line against $label"
  }
  field() { sed -E "s/.* $1=([0-9.]+).*/\1/" <<<"$line"; }
  r_rps="$(field rps)"
  r_p50="$(field p50_us)"
  r_p99="$(field p99_us)"
  r_requests="$(field requests)"
  r_non2xx="$(field non2xx)"
  r_errors="$(field errors)"
  # shellcheck disable=SC2034  # read by bench.sh
  r_detail="connect=$(field connect) read=$(field read) write=$(field write) timeout=$(field timeout)"
  printf 'bench: %-8s %-9s %10s req/s  p50 %6s us  p99 %7s us  requests %s  non2xx %s  socket errors %s\n' \
    "$label" "($duration)" "$r_rps" "$r_p50" "$r_p99" "$r_requests" "$r_non2xx" "$r_errors" >&2
}

# Builds adbeacon in release (and whatever else the arguments name, such as --example bare) and
# sets app_bin to the binary.
# shellcheck disable=SC2120  # the arguments are optional
build_release() { # [CARGO_BUILD_ARGS...]
  log "cargo build --release --bin adbeacon $*"
  cargo build --release --bin adbeacon "$@"
  # shellcheck disable=SC2034  # read by the scripts
  app_bin="$PWD/target/release/adbeacon"
}

# kernel_preemption: the kernel's preemption model as its boot log states it (none, voluntary,
# full, lazy), or "unknown". With `none`, a process working inside the kernel (ClickHouse writing
# parts) keeps its core until a scheduling point whatever its priority or class, so SCHED_IDLE
# does not keep it from delaying wrk or adbeacon by milliseconds: the reports say so.
kernel_preemption() {
  local mode
  mode="$(dmesg 2>/dev/null | sed -n 's/.*Dynamic Preempt: \([a-z]*\).*/\1/p' | tail -n 1)"
  printf '%s\n' "${mode:-unknown}"
}

# The commit the figures were taken at, "+dirty" when the working tree differs from it.
git_rev() {
  local rev
  rev="$(git rev-parse --short HEAD 2>/dev/null || echo none)"
  # --no-optional-locks: never take the index lock from under someone's git command.
  if [ -n "$(git --no-optional-locks status --porcelain 2>/dev/null | head -n 1)" ]; then rev="$rev+dirty"; fi
  printf '%s\n' "$rev"
}
