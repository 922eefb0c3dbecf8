#!/usr/bin/env bash
# The local stack for `make run`: one ClickHouse and one Redis on loopback,
# with their data under ./.data so a restart finds it again.
#
#   scripts/stack.sh start              start both (reusing any that already answer)
#   scripts/stack.sh stop [NAME...]     stop what this script started (NAME: clickhouse, redis)
#   scripts/stack.sh status             say what answers, and who started it
#
# Ports: CH_HTTP_PORT (8123), CH_TCP_PORT (19000), REDIS_PORT (6379).
# A server that already answers on its port is used as it is and never
# stopped by this script: only servers with a pid file under $STACK_DIR/*/stack.pid
# were started here. If STACK_STARTED_LOG names a file, `start` appends the
# names of the servers it launched to it (scripts/run.sh stops just those).
# STACK_DIR (./.data) holds the servers' data and pid files: a private stack in
# another directory, on other ports, lives and stops independently of this one
# (scripts/fuzz.sh starts one like that).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"

CH_HTTP_PORT="${CH_HTTP_PORT:-8123}"
CH_TCP_PORT="${CH_TCP_PORT:-19000}"
REDIS_PORT="${REDIS_PORT:-6379}"
START_TIMEOUT="${STACK_START_TIMEOUT:-60}" # seconds, per server
STOP_TIMEOUT="${STACK_STOP_TIMEOUT:-30}"   # seconds before SIGKILL

# Debian puts clickhouse-server in /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

data_dir="${STACK_DIR:-$root/.data}"
ch_dir="$data_dir/clickhouse"
redis_dir="$data_dir/redis"

log() { echo "stack: $*" >&2; }

pid_file() { # NAME -> the pid file that marks a server this script started
  case "$1" in
    clickhouse) echo "$ch_dir/stack.pid" ;;
    redis) echo "$redis_dir/stack.pid" ;;
    *)
      log "unknown server '$1' (expected clickhouse or redis)"
      exit 2
      ;;
  esac
}

server_log() { # NAME -> the log to show when it fails
  case "$1" in
    clickhouse) echo "$ch_dir/log/clickhouse-server.log $ch_dir/log/stdout.log" ;;
    redis) echo "$redis_dir/redis.log $redis_dir/stdout.log" ;;
  esac
}

ch_ping() {
  [ "$(curl -fsS --noproxy "*" --max-time 2 "http://127.0.0.1:$CH_HTTP_PORT/ping" 2>/dev/null)" = "Ok." ]
}

redis_ping() {
  [ "$(timeout 3 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]
}

ping_server() {
  case "$1" in
    clickhouse) ch_ping ;;
    redis) redis_ping ;;
  esac
}

port_of() {
  case "$1" in
    clickhouse) echo "$CH_HTTP_PORT" ;;
    redis) echo "$REDIS_PORT" ;;
  esac
}

# True while PID runs the expected program. Checks the command line so a
# recycled pid is never signalled, and treats a zombie as gone (a container's
# pid 1 may be slow to reap).
alive() { # NAME PID
  local name="$1" pid="$2" state
  [ -r "/proc/$pid/stat" ] || return 1
  state="$(sed -E 's/^[0-9]+ \(.*\) (.).*/\1/' "/proc/$pid/stat" 2>/dev/null)" || return 1
  [ "$state" != Z ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$name-server"
}

# Prints the pid this script recorded for NAME if it still runs; otherwise
# drops a stale pid file (e.g. after a reboot) and fails.
owned_pid() { # NAME
  local file pid
  file="$(pid_file "$1")"
  [ -f "$file" ] || return 1
  pid="$(cat "$file")"
  if [ -n "$pid" ] && alive "$1" "$pid"; then
    echo "$pid"
    return 0
  fi
  rm -f "$file"
  return 1
}

port_busy() { # PORT: something accepts connections on it
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# A freshly forked launcher is still a copy of this shell for a moment; wait
# for it to become the server (or die) so `alive` judges the right program.
await_exec() { # NAME PID
  for _ in $(seq 1 50); do
    if alive "$1" "$2" || ! kill -0 "$2" 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
}

# sed replacement text with its special characters escaped.
sed_escape() { printf '%s' "$1" | sed -e 's/[\\|&]/\\&/g'; }

launch_clickhouse() {
  mkdir -p "$ch_dir/log" "$ch_dir/data" "$ch_dir/tmp" "$ch_dir/user_files" "$ch_dir/format_schemas"
  # Rendered on each start so a port change takes effect; users.xml is
  # referenced relatively, so it sits next to config.xml.
  sed -e "s|@HTTP_PORT@|$CH_HTTP_PORT|g" \
    -e "s|@TCP_PORT@|$CH_TCP_PORT|g" \
    -e "s|@DIR@|$(sed_escape "$ch_dir")|g" \
    clickhouse/local/config.xml >"$ch_dir/config.xml"
  cp clickhouse/local/users.xml "$ch_dir/users.xml"
  if port_busy "$CH_TCP_PORT"; then
    # listen_try=1 lets ClickHouse come up on HTTP alone, which is all the
    # service uses; clickhouse-client would reach the other server, though.
    log "warning: tcp port $CH_TCP_PORT is taken by another program; ClickHouse will serve HTTP only (set CH_TCP_PORT to change)"
  fi
  # setsid: its own session, so a Ctrl-C meant for `make run` doesn't reach
  # it before the service has flushed its last batch into it.
  (cd "$ch_dir" && exec setsid clickhouse-server --config-file="$ch_dir/config.xml") \
    </dev/null >>"$ch_dir/log/stdout.log" 2>&1 &
  echo $! >"$(pid_file clickhouse)"
  await_exec clickhouse $!
}

launch_redis() {
  mkdir -p "$redis_dir"
  # Written on each start for the same reason; appendonly keeps spilled
  # events across restarts and noeviction makes a full Redis refuse writes
  # instead of silently dropping spilled events.
  cat >"$redis_dir/redis.conf" <<EOF
# Generated by scripts/stack.sh; edits are overwritten on the next start.
bind 127.0.0.1
protected-mode yes
port $REDIS_PORT
daemonize no
dir "$redis_dir"
pidfile "$redis_dir/redis.pid"
logfile "$redis_dir/redis.log"
appendonly yes
maxmemory-policy noeviction
EOF
  (exec setsid redis-server "$redis_dir/redis.conf") </dev/null >>"$redis_dir/stdout.log" 2>&1 &
  echo $! >"$(pid_file redis)"
  await_exec redis $!
}

# Sends SIGTERM, waits up to STOP_TIMEOUT, then SIGKILL. Only for pids from
# our own pid files.
stop_server() { # NAME
  local name="$1" pid waited=0
  if ! pid="$(owned_pid "$name")"; then
    if ping_server "$name"; then
      log "$name on port $(port_of "$name") was not started by stack.sh; leaving it running"
    fi
    return 0
  fi
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  while alive "$name" "$pid"; do
    if [ "$waited" -ge $((STOP_TIMEOUT * 10)) ]; then
      log "$name did not stop within ${STOP_TIMEOUT}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  rm -f "$(pid_file "$name")"
}

# Log sizes when this `start` began, so a failure shows only this attempt's lines.
declare -A log_offset=()
mark_logs() { # NAME
  local f
  for f in $(server_log "$1"); do
    log_offset[$f]="$(stat -c %s "$f" 2>/dev/null || echo 0)"
  done
}

show_log_tail() { # NAME
  local f new
  for f in $(server_log "$1"); do
    [ -s "$f" ] || continue
    new="$(tail -c +$((${log_offset[$f]:-0} + 1)) "$f" | tail -n 25)"
    if [ -n "$new" ]; then
      echo "---- $f (last lines) ----" >&2
      echo "$new" >&2
    fi
  done
}

launched=() # servers this `start` launched, to undo on failure

abort_start() {
  local name
  for name in "${launched[@]}"; do
    stop_server "$name"
  done
}

cmd_start() {
  local name pid waited
  mkdir -p "$data_dir"
  trap 'log "interrupted"; abort_start; exit 130' INT TERM

  for name in clickhouse redis; do
    if ping_server "$name"; then
      if pid="$(owned_pid "$name")"; then
        log "$name already running on port $(port_of "$name") (pid $pid, started by stack.sh)"
      else
        log "$name already answers on port $(port_of "$name"); reusing it (not started here, will not be stopped)"
      fi
      continue
    fi
    if pid="$(owned_pid "$name")"; then
      # Ours but not answering: most likely still starting up; wait below.
      log "$name (pid $pid) is running but not answering yet"
      continue
    fi
    log "starting $name on port $(port_of "$name")"
    mark_logs "$name"
    "launch_$name"
    launched+=("$name")
    if [ -n "${STACK_STARTED_LOG:-}" ]; then
      echo "$name" >>"$STACK_STARTED_LOG"
    fi
  done

  for name in clickhouse redis; do
    waited=0
    until ping_server "$name"; do
      pid="$(owned_pid "$name")" || pid=""
      if [ -z "$pid" ]; then
        log "error: $name exited during start-up (port $(port_of "$name"))"
        show_log_tail "$name"
        abort_start
        exit 1
      fi
      if [ "$waited" -ge $((START_TIMEOUT * 10)) ]; then
        log "error: $name did not answer on port $(port_of "$name") within ${START_TIMEOUT}s"
        show_log_tail "$name"
        abort_start
        exit 1
      fi
      sleep 0.1
      waited=$((waited + 1))
    done
  done
  trap - INT TERM
  log "up: clickhouse http://127.0.0.1:$CH_HTTP_PORT, redis redis://127.0.0.1:$REDIS_PORT"
}

cmd_stop() {
  local name
  if [ "$#" -eq 0 ]; then
    set -- redis clickhouse
  fi
  for name in "$@"; do
    pid_file "$name" >/dev/null # validates the name
    stop_server "$name"
  done
}

cmd_status() {
  local name pid up=0 total=0 owner
  for name in clickhouse redis; do
    total=$((total + 1))
    if pid="$(owned_pid "$name")"; then
      owner="started by stack.sh, pid $pid"
    else
      owner="not started by stack.sh"
    fi
    if ping_server "$name"; then
      up=$((up + 1))
      echo "$name: up on port $(port_of "$name") ($owner)"
    elif [ -n "$pid" ]; then
      echo "$name: not answering on port $(port_of "$name") ($owner)"
    else
      echo "$name: down (port $(port_of "$name"))"
    fi
    pid=""
  done
  # Exit 0 only when the whole stack answers, so scripts can test it.
  [ "$up" -eq "$total" ]
}

case "${1:-}" in
  start) cmd_start ;;
  stop)
    shift
    cmd_stop "$@"
    ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 start|stop [clickhouse|redis]...|status" >&2
    exit 2
    ;;
esac
