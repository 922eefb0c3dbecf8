#!/usr/bin/env bash
# Static checks of docker-compose.yml, the Dockerfile and deploy/ (part of `make test`).
# No Docker engine runs on our machines, so nothing is started: the files are parsed and checked
# (tests/deploy/check_deploy.py), and Prometheus's own promtool checks the scrape config, the
# alert rules and their unit tests. `scripts/deps.sh test` installs promtool and PyYAML.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=.data/venv/bin/python
if ! "$python" -c 'import yaml' 2>/dev/null || ! command -v promtool >/dev/null; then
  echo "check-deploy: needs PyYAML in .data/venv and promtool; run scripts/deps.sh test" >&2
  exit 1
fi

"$python" tests/deploy/check_deploy.py
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts.test.yml
