"""Static checks of the deployment files; no Docker engine is needed (none runs on our machines).

Run by scripts/check-deploy.sh (part of `make test`), which also runs promtool. Checks:
  * every YAML file of the stack parses (docker-compose.yml, deploy/**/*.yml);
  * docker-compose.yml: the five services, each with a healthcheck; images pinned (no `latest`,
    no untagged image); adbeacon built from the Dockerfile, waiting on a healthy ClickHouse and
    Redis, with its environment complete (every variable it is given is one `adbeacon --help`
    lists, REDIS_URL naming the redis service); the ClickHouse credentials the same for
    adbeacon, ClickHouse and Grafana; Redis with AOF, a maxmemory and noeviction; named
    volumes for every stateful service; every bind-mounted path exists; no secret in the file
    beyond the documented local-only defaults;
  * Dockerfile: multi-stage, a non-root USER, DATA_DIR on a VOLUME, EXPOSE 8080, a HEALTHCHECK on
    /healthz, ENTRYPOINT adbeacon / CMD serve; its HEALTHCHECK equals the compose one;
  * Grafana: data sources and dashboard providers parse; every dashboard JSON parses, its panels
    refer only to provisioned data source uids, and panel ids are unique.
The metric names the dashboards and alert rules use are checked against a live /metrics by the
Rust test tests/it/deploy.rs; the dashboard SQL runs on the current ClickHouse engine in
tests/sql/conformance.py.

Output: `ok   <check>` / `FAIL <check>: <reason>` per check, then `N passed, M failed`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"adbeacon", "clickhouse", "redis", "prometheus", "grafana"}
# Defaults that are allowed to appear in the repository: clearly for a local stack only.
LOCAL_SECRETS = {"adbeacon-local-only", "admin-local-only"}
SECRET_VARS = {"CLICKHOUSE_PASSWORD", "GF_SECURITY_ADMIN_PASSWORD", "API_KEYS", "IP_HASH_KEY"}

passed = 0
failed = 0


def check(name: str, problem: str | None) -> None:
    global passed, failed
    if problem:
        failed += 1
        print(f"FAIL {name}: {problem}")
    else:
        passed += 1
        print(f"ok   {name}")


def first(problems) -> str | None:
    problems = [p for p in problems if p]
    return "; ".join(problems) if problems else None


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def default_of(value: str) -> str:
    """The value compose uses when the variables are unset: ${X:-d} → d, ${X} → ''."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def documented_settings() -> set[str]:
    text = (ROOT / "src" / "config.rs").read_text()
    return set(re.findall(r'^\s*(?:s\(|name:)\s*"([A-Z_]+)"', text, re.M))


def main() -> int:
    yaml_files = [ROOT / "docker-compose.yml", *sorted((ROOT / "deploy").rglob("*.yml"))]
    docs = {}
    for path in yaml_files:
        rel = path.relative_to(ROOT)
        try:
            docs[rel.as_posix()] = yaml.safe_load(path.read_text())
            check(f"{rel} parses", None)
        except Exception as e:  # noqa: BLE001 - any parse error is the finding
            check(f"{rel} parses", str(e).splitlines()[0])
    compose = docs.get("docker-compose.yml")
    if not isinstance(compose, dict):
        check("docker-compose.yml is a mapping", "not parsed")
        return report()
    services = compose.get("services") or {}

    check("compose: the five services", first([
        f"missing {sorted(SERVICES - set(services))}" if SERVICES - set(services) else None,
        f"unexpected {sorted(set(services) - SERVICES)}" if set(services) - SERVICES else None,
    ]))
    check("compose: every service has a healthcheck", first(
        f"{n} has none" for n, s in services.items() if not (s.get("healthcheck") or {}).get("test")))

    def image_problem(name: str, s: dict) -> str | None:
        image = s.get("image", "")
        if "build" in s:
            return None
        if ":" not in image:
            return f"{name}: image {image!r} has no tag"
        tag = image.rsplit(":", 1)[1]
        if tag in {"latest", "main", "master", "nightly"}:
            return f"{name}: image {image!r} is not pinned"
        return None

    check("compose: images pinned, none `latest`", first(image_problem(n, s) for n, s in services.items()))
    ch_image = services.get("clickhouse", {}).get("image", "")
    check("compose: ClickHouse is a current LTS (25.3, 25.8 or later .3/.8)", (
        None if re.fullmatch(r"clickhouse/clickhouse-server:(2[5-9])\.(3|8)(\.[\d.]+)?", ch_image)
        else f"image {ch_image!r}"))
    redis = services.get("redis", {})
    check("compose: Redis 7", None if re.fullmatch(r"redis:7(\.\d+)*(-\w+)?", redis.get("image", "")) else redis.get("image"))

    app = services.get("adbeacon", {})
    app_env = env_of(app)
    check("compose: adbeacon built from the Dockerfile", None if app.get("build") in (".", {"context": "."}) else f"build: {app.get('build')!r}")

    def waits_healthy(name: str, deps: list[str]) -> str | None:
        d = services.get(name, {}).get("depends_on") or {}
        if isinstance(d, list):
            return f"{name}: depends_on is a list (no health condition)"
        return first(
            f"{name} does not wait for {dep} to be healthy"
            for dep in deps if (d.get(dep) or {}).get("condition") != "service_healthy")

    check("compose: depends_on healthy services", first([
        waits_healthy("adbeacon", ["clickhouse", "redis"]),
        waits_healthy("grafana", ["prometheus", "clickhouse"]),
    ]))
    known = documented_settings()
    expected = {
        "CLICKHOUSE_URL": "http://clickhouse:8123",
        "CLICKHOUSE_DATABASE": "adbeacon",
        "REDIS_URL": "redis://redis:6379/0",
        "DATA_DIR": "/var/lib/adbeacon",
        "LOG_FORMAT": "json",
    }
    check("compose: adbeacon environment", first([
        *(f"{k}={app_env.get(k)!r}, want {v!r}" for k, v in expected.items() if app_env.get(k) != v),
        *(f"{k} missing" for k in ["CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD", "API_KEYS", "TRUSTED_PROXIES"] if k not in app_env),
        *(f"{k} is not a setting adbeacon reads (src/config.rs)" for k in app_env if k not in known),
        "no settings found in src/config.rs" if len(known) < 10 else None,
    ]))
    ch_env = env_of(services.get("clickhouse", {}))
    gf_env = env_of(services.get("grafana", {}))
    check("compose: one ClickHouse user and password for adbeacon, ClickHouse and Grafana", first([
        None if app_env.get("CLICKHOUSE_USER") == ch_env.get("CLICKHOUSE_USER") == gf_env.get("CLICKHOUSE_USER") else "users differ",
        None if app_env.get("CLICKHOUSE_PASSWORD") == ch_env.get("CLICKHOUSE_PASSWORD") == gf_env.get("CLICKHOUSE_PASSWORD") else "passwords differ",
        None if ch_env.get("CLICKHOUSE_DB") == app_env.get("CLICKHOUSE_DATABASE") else "CLICKHOUSE_DB is not adbeacon's database",
        None if default_of(ch_env.get("CLICKHOUSE_PASSWORD", "")) else "ClickHouse has no password",
        None if "${" in ch_env.get("CLICKHOUSE_PASSWORD", "") else "the password is not taken from the environment",
    ]))
    secrets = {**{k: v for k, v in app_env.items() if k in SECRET_VARS},
               **{k: v for k, v in ch_env.items() if k in SECRET_VARS},
               **{k: v for k, v in gf_env.items() if k in SECRET_VARS}}
    check("compose: secrets come from the environment; defaults only the local-only ones", first(
        f"{k}: {'default' if '${' in v else 'value'} {default_of(v)!r} is a secret in the repository"
        for k, v in secrets.items() if default_of(v) and default_of(v) not in LOCAL_SECRETS))
    command = " ".join(map(str, redis.get("command") or [])) if isinstance(redis.get("command"), list) else str(redis.get("command", ""))
    check("compose: Redis with AOF on, a maxmemory and noeviction", first([
        None if re.search(r"--appendonly\s+yes", command) else "no --appendonly yes",
        None if re.search(r"--maxmemory\s+\S", command) else "no --maxmemory (Redis would grow until the host kills it)",
        None if re.search(r"--maxmemory-policy\s+noeviction", command) else "no --maxmemory-policy noeviction",
    ]))
    named = set((compose.get("volumes") or {}).keys())

    def volume_problems(name: str, target: str) -> str | None:
        mounts = [str(v) for v in services.get(name, {}).get("volumes") or []]
        for m in mounts:
            src, _, rest = m.partition(":")
            if rest.split(":")[0] == target:
                return None if src in named else f"{name}: {target} is not on a named volume"
        return f"{name}: nothing mounted on {target}"

    check("compose: state on named volumes", first([
        volume_problems("adbeacon", "/var/lib/adbeacon"),
        volume_problems("clickhouse", "/var/lib/clickhouse"),
        volume_problems("redis", "/data"),
        volume_problems("prometheus", "/prometheus"),
        volume_problems("grafana", "/var/lib/grafana"),
    ]))
    binds = [(n, str(v).split(":")[0]) for n, s in services.items() for v in s.get("volumes") or []
             if str(v).startswith((".", "/"))]
    check("compose: every bind-mounted path exists", first(
        f"{n}: {p} does not exist" for n, p in binds if not (ROOT / p).exists()) if binds else "no bind mounts")
    prom_cmd = " ".join(services.get("prometheus", {}).get("command") or [])
    check("compose: Prometheus reads deploy/prometheus/prometheus.yml", first([
        None if "--config.file=/etc/prometheus/prometheus.yml" in prom_cmd else "no --config.file",
        None if ("prometheus", "./deploy/prometheus") in binds else "deploy/prometheus not mounted",
    ]))
    check("compose: Grafana gets the ClickHouse plugin and the provisioning", first([
        None if "grafana-clickhouse-datasource" in gf_env.get("GF_PLUGINS_PREINSTALL_SYNC", "") else "plugin not preinstalled",
        None if ("grafana", "./deploy/grafana/provisioning") in binds else "provisioning not mounted",
        None if ("grafana", "./deploy/grafana/dashboards") in binds else "dashboards not mounted",
    ]))

    # --- Dockerfile --------------------------------------------------------------------------
    dockerfile = (ROOT / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", dockerfile).splitlines()
    instr = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if len(l.split(None, 1)) > 1 else "")
             for l in (l.strip() for l in lines) if l and not l.startswith("#")]
    froms = [a for i, a in instr if i == "FROM"]
    final = instr[max(k for k, (i, _) in enumerate(instr) if i == "FROM"):]
    users = [a.strip() for i, a in final if i == "USER"]
    check("Dockerfile: multi-stage, Rust build, slim or distroless final image", first([
        None if len(froms) >= 2 else f"{len(froms)} stage(s)",
        None if froms and re.match(r"rust:1[\w.-]*", froms[0]) else f"build stage {froms[:1]}",
        None if froms and re.match(r"(debian:\w+-slim|gcr\.io/distroless/cc)", froms[-1]) else f"final stage {froms[-1:]}",
        *(f"{f} is not pinned" for f in froms if ":" not in f.split()[0] or f.split()[0].endswith(":latest")),
    ]))
    check("Dockerfile: runs as a non-root user", first([
        None if users else "no USER in the final stage",
        *(f"USER {u} is root" for u in users if u.split(":")[0] in {"root", "0"}),
    ]))
    final_args = {i: a for i, a in final}
    health = final_args.get("HEALTHCHECK", "")
    check("Dockerfile: DATA_DIR volume, port, health check, entrypoint", first([
        None if "DATA_DIR=/var/lib/adbeacon" in final_args.get("ENV", "") else "DATA_DIR not /var/lib/adbeacon",
        None if "/var/lib/adbeacon" in final_args.get("VOLUME", "") else "no VOLUME for DATA_DIR",
        None if final_args.get("EXPOSE", "").split() == ["8080"] else "EXPOSE is not 8080",
        None if "/healthz" in health else "no HEALTHCHECK on /healthz",
        None if final_args.get("ENTRYPOINT", "").replace(" ", "") == '["adbeacon"]' else "ENTRYPOINT is not [\"adbeacon\"]",
        None if final_args.get("CMD", "").replace(" ", "") == '["serve"]' else "CMD is not [\"serve\"]",
    ]))
    docker_test = json.loads(health.split("CMD", 1)[1]) if "CMD" in health else None
    check("Dockerfile and compose run the same adbeacon health check", None if docker_test == (
        app.get("healthcheck") or {}).get("test")[1:] else f"{docker_test} vs {(app.get('healthcheck') or {}).get('test')}")
    ignore = (ROOT / ".dockerignore").read_text().split() if (ROOT / ".dockerignore").exists() else []
    check(".dockerignore keeps target/, .data/ and .git out", first(
        f"{p} not ignored" for p in ["target", ".data", ".git"] if not ({p, p + "/", "/" + p, "/" + p + "/"} & set(ignore))))

    # --- Grafana ------------------------------------------------------------------------------
    ds_docs = [d for k, d in docs.items() if k.startswith("deploy/grafana/provisioning/datasources/")]
    uids = {ds.get("uid"): ds.get("type") for d in ds_docs for ds in (d or {}).get("datasources", [])}
    check("Grafana: Prometheus and ClickHouse data sources provisioned", first([
        None if uids.get("prometheus") == "prometheus" else "no prometheus uid",
        None if uids.get("clickhouse") == "grafana-clickhouse-datasource" else "no clickhouse uid",
    ]))
    providers = [p for k, d in docs.items() if k.startswith("deploy/grafana/provisioning/dashboards/")
                 for p in (d or {}).get("providers", [])]
    check("Grafana: a dashboard provider reads the mounted dashboards", None if any(
        (p.get("options") or {}).get("path") == "/etc/grafana/dashboards" for p in providers) else "none")
    dashboards = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
    check("Grafana: dashboards exist", None if dashboards else "no deploy/grafana/dashboards/*.json")
    for path in dashboards:
        rel = path.relative_to(ROOT)
        try:
            dash = json.loads(path.read_text())
        except ValueError as e:
            check(f"{rel} parses", str(e))
            continue
        check(f"{rel} parses", None)
        panels = [p for top in dash.get("panels", []) for p in [top, *top.get("panels", [])]]
        refs = [(p.get("title"), (t.get("datasource") or p.get("datasource") or {}).get("uid"))
                for p in panels if p.get("type") != "row" for t in p.get("targets") or [{}]]
        check(f"{rel}: every panel uses a provisioned data source", first(
            f"{title!r} uses {uid!r}" for title, uid in refs if uid not in uids))
        ids = [p.get("id") for p in panels]
        check(f"{rel}: panel ids unique", None if len(ids) == len(set(ids)) else "duplicate ids")
        check(f"{rel}: every query has an expression or SQL", first(
            f"{p.get('title')!r} target {t.get('refId')}" for p in panels if p.get("type") != "row"
            for t in p.get("targets") or [] if not (t.get("expr") or t.get("rawSql"))))
    return report()


def report() -> int:
    print(f"{passed} passed, {failed} failed")
    return 0 if passed and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
