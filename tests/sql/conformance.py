"""SQL conformance check against the current ClickHouse engine, through chDB.

Why this exists: adbeacon's SQL (clickhouse/migrations/*.sql and clickhouse/queries/*.sql) must
run unchanged on two ClickHouse generations. Dev machines can only install ClickHouse 18.16, which
is what the Rust integration tests (tests/it) run against; production runs a current ClickHouse.
chDB embeds the current engine in-process, so this script proves the other half without a server:

  * every migration applies, in order, into a fresh database, and applies a second time
    (they are all IF NOT EXISTS: "safe to apply twice");
  * the schema_migrations ledger statements the service runs (src/store/migrate.rs) work;
  * sample events fed through the materialized view ad_stats_hourly_mv land in ad_stats_hourly
    with exactly the numbers a recount from raw `events` gives;
  * every clickhouse/queries/*.sql runs on the sample data (parameters come from the file's
    `-- sample-params: ...` line) and, for the queries the service depends on, answers sensibly.

Files are discovered by globbing, so new migrations and queries are covered without editing this.

Run:   .data/venv/bin/python tests/sql/conformance.py     (`make test` runs it too)
Env:   ADBEACON_ROOT=/path/to/checkout  to check another tree (default: this script's repository).
Output: `ok   <check>` / `FAIL <check>: <reason>` per check, then `N passed, M failed`.
Exit:  0 when everything passed, 1 on any failure or when no check ran.
"""

from __future__ import annotations

import os
import random
import re
import sys
import tempfile
import traceback
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

try:
    from chdb import session as chdb_session
except ImportError:
    print("FAIL chdb: the Python package chdb is not importable by " + sys.executable)
    print("  install it with `make test` (scripts/deps.sh puts chdb-core into .data/venv)")
    print("  or: .data/venv/bin/python -m pip install chdb-core")
    print("0 passed, 1 failed")
    sys.exit(1)

ROOT = Path(os.environ.get("ADBEACON_ROOT") or Path(__file__).resolve().parents[2])
MIGRATIONS_DIR = ROOT / "clickhouse" / "migrations"
QUERIES_DIR = ROOT / "clickhouse" / "queries"
DB = "conformance"

# The ledger statements of src/store/migrate.rs, verbatim.
CREATE_LEDGER = (
    "CREATE TABLE IF NOT EXISTS schema_migrations "
    "(version UInt32, name String, checksum UInt64, applied_at DateTime('UTC')) "
    "ENGINE = ReplacingMergeTree ORDER BY version"
)
INSERT_LEDGER = (
    "INSERT INTO schema_migrations (version, name, checksum, applied_at) SELECT {version}, '{name}', {checksum}, now()"
)
READ_LEDGER = (
    "SELECT version, argMax(name, applied_at), argMax(checksum, applied_at) FROM schema_migrations GROUP BY version"
)

KINDS = [
    "impression", "click", "creative_view", "start", "first_quartile", "midpoint", "third_quartile",
    "complete", "skip", "pause", "resume", "mute", "unmute", "close", "error",
]  # fmt: skip

# How to recount every aggregate column of ad_stats_hourly from raw `events`. A column of the
# table missing here fails the check: add its recount when a migration adds the column.
RECOUNT = {
    "impressions": "countIf(kind = 'impression')",
    "clicks": "countIf(kind = 'click')",
    "unique_clicks": "uniqExactIf(ip_hash, kind = 'click')",
    "creative_views": "countIf(kind = 'creative_view')",
    "starts": "countIf(kind = 'start')",
    "first_quartiles": "countIf(kind = 'first_quartile')",
    "midpoints": "countIf(kind = 'midpoint')",
    "third_quartiles": "countIf(kind = 'third_quartile')",
    "completes": "countIf(kind = 'complete')",
    "skips": "countIf(kind = 'skip')",
    "pauses": "countIf(kind = 'pause')",
    "resumes": "countIf(kind = 'resume')",
    "mutes": "countIf(kind = 'mute')",
    "unmutes": "countIf(kind = 'unmute')",
    "closes": "countIf(kind = 'close')",
    "errors": "countIf(kind = 'error')",
    # sumIf over Nullable is NULL when no row matches; the view stores 0 there.
    "click_playback_sum": "ifNull(sumIf(toFloat64(playback_time), kind = 'click'), 0)",
    "click_playback_count": "countIf(kind = 'click' AND isNotNull(playback_time))",
}
STATS_KEY = ("ad_id", "hour")

# --- sample data -----------------------------------------------------------------------------

AD1 = "11111111-1111-1111-1111-111111111111"  # three versions, inserted out of order; active
AD2 = "22222222-2222-2222-2222-222222222222"  # active at first, deactivated by its newest version
AD3 = "33333333-3333-3333-3333-333333333333"  # one version, active
AD4 = "44444444-4444-4444-4444-444444444444"  # one version, never active
UNKNOWN_AD = "99999999-9999-9999-9999-999999999999"  # events for an ad the catalog doesn't hold

# (id, name, active, created_at, updated_at, version), in insertion order.
ADS = [
    (AD1, "ad one v1", 1, "2024-03-01 10:00:00", "2024-03-01 10:00:00", 1),
    (AD1, "ad one v3", 1, "2024-03-01 10:00:00", "2024-03-05 09:00:00", 3),
    (AD1, "ad one v2", 0, "2024-03-01 10:00:00", "2024-03-03 08:00:00", 2),
    (AD2, "ad two v1", 1, "2024-03-02 10:00:00", "2024-03-02 10:00:00", 1),
    (AD2, "ad two v2", 0, "2024-03-02 10:00:00", "2024-03-04 10:00:00", 2),
    (AD3, "ad three", 1, "2024-02-28 12:00:00", "2024-02-28 12:00:00", 1),
    (AD4, "ad four", 0, "2024-03-06 12:00:00", "2024-03-06 12:00:00", 1),
]


def newest(ad_id: str) -> tuple:
    return max((a for a in ADS if a[0] == ad_id), key=lambda a: a[5])


ACTIVE_NAMES = {i: newest(i)[1] for i in {a[0] for a in ADS} if newest(i)[2] == 1}


def sample_events(n: int = 360) -> list[str]:
    """VALUES tuples for `events`: all kinds, several ads, 21:00 on 31 March to 03:00 on 1 April UTC
    (a day, month and partition boundary), repeated client IPs, some NULL playback_time."""
    rng = random.Random(20240331)
    start = datetime(2024, 3, 31, 21, 0, 0, tzinfo=timezone.utc)
    ads = [AD1, AD2, AD3, AD4, UNKNOWN_AD]
    rows = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        ad = ads[(i // len(KINDS) + i) % len(ads)]
        t = start + timedelta(seconds=rng.randrange(6 * 3600))
        received = t + timedelta(seconds=rng.randrange(5))
        playback = "NULL" if i % 4 == 0 else repr(rng.randrange(0, 120) / 4)  # exact in Float32
        error_code = rng.choice([100, 303, 400, 901]) if kind == "error" else 0
        rows.append(
            f"('{uuid.UUID(int=rng.getrandbits(128))}', '{ad}', '{kind}', '{t:%Y-%m-%d %H:%M:%S}', "
            f"'{received:%Y-%m-%d %H:%M:%S}', {rng.randrange(1, 25)}, {playback}, {error_code}, "
            f"'{uuid.UUID(int=i // 90 + 1)}')"
        )
    return rows


# --- plumbing --------------------------------------------------------------------------------


class Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def ok(self, name: str) -> None:
        self.passed += 1
        print(f"ok   {name}", flush=True)

    def fail(self, name: str, reason: str) -> None:
        self.failed += 1
        reason = " ".join(str(reason).split())  # one line per check
        print(f"FAIL {name}: {reason}", flush=True)

    def run(self, name: str, fn, *args) -> bool:
        """Runs fn; an exception or a returned string is a failure. Returns whether it passed."""
        try:
            problem = fn(*args)
        except Exception as e:  # chdb raises chdb.ChdbError (a RuntimeError) for server errors
            self.fail(name, f"{type(e).__name__}: {e}")
            return False
        if problem:
            self.fail(name, problem)
            return False
        self.ok(name)
        return True


class Engine:
    """A chDB session on a throwaway directory."""

    def __init__(self, path: str) -> None:
        self.s = chdb_session.Session(path)

    def execute(self, sql: str) -> str:
        res = self.s.query(sql, "TabSeparatedWithNames")
        # Current chdb raises; older builds returned a result carrying the error instead.
        if hasattr(res, "has_error") and res.has_error():
            raise RuntimeError(res.error_message())
        return res.bytes().decode() if hasattr(res, "bytes") else str(res)

    def rows(self, sql: str) -> list[dict[str, str]]:
        """The result as dicts keyed by column name (values as TSV text)."""
        lines = [l for l in self.execute(sql).split("\n") if l]
        if not lines:
            return []
        names = lines[0].split("\t")
        return [dict(zip(names, l.split("\t"))) for l in lines[1:]]

    def scalar(self, sql: str) -> str:
        rows = self.rows(sql)
        if len(rows) != 1 or len(rows[0]) != 1:
            raise AssertionError(f"expected one value from {sql!r}, got {rows}")
        return next(iter(rows[0].values()))

    def close(self) -> None:
        self.s.close()


def statements(text: str) -> list[str]:
    """Split like Migration::statements: drop `--` lines, join with newlines, split on `;`."""
    kept = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("--"))
    return [s.strip() for s in kept.split(";") if s.strip()]


def split_literals(text: str) -> list[str]:
    """`'a', 'b,c', 42` -> ["'a'", "'b,c'", "42"]: commas inside quoted literals don't split."""
    out, cur, quote, i = [], "", None, 0
    while i < len(text):
        c = text[i]
        if quote:
            cur += c
            if c == "\\" and i + 1 < len(text):
                cur += text[i + 1]
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"`":
            quote, cur = c, cur + c
        elif c == ",":
            out.append(cur.strip())
            cur = ""
        else:
            cur += c
        i += 1
    if quote:
        raise ValueError(f"unterminated quote in sample-params: {text}")
    if cur.strip() or out:
        out.append(cur.strip())
    return out


def bind(sql: str, params: list[str]) -> str:
    """Substitute `?` in order, like the Rust client's SqlBuilder (`??` stands for a literal `?`)."""
    parts = re.split(r"(\?\??)", sql)
    want = sum(1 for p in parts if p == "?")
    if want != len(params):
        raise ValueError(f"{want} `?` placeholder(s) but {len(params)} sample param(s)")
    it = iter(params)
    return "".join(next(it) if p == "?" else "?" if p == "??" else p for p in parts)


# --- the checks ------------------------------------------------------------------------------


def migration_files() -> list[tuple[int, Path]]:
    found = []
    for p in sorted(MIGRATIONS_DIR.glob("*.sql")):
        m = re.fullmatch(r"(\d{4})_.+\.sql", p.name)
        if not m:
            raise ValueError(f"{p.name} is not named NNNN_name.sql")
        found.append((int(m.group(1)), p))
    return found


def check_migration_files(files) -> str | None:
    if not files:
        return f"no migrations in {MIGRATIONS_DIR}"
    versions = [v for v, _ in files]
    if versions != list(range(1, len(files) + 1)):
        return f"versions are not 1..{len(files)} without gaps: {versions}"
    return None


def apply_migration(ch: Engine, path: Path) -> str | None:
    stmts = statements(path.read_text())
    if not stmts:
        return "no statements"
    for i, st in enumerate(stmts, 1):
        try:
            ch.execute(st)
        except Exception as e:
            first = st.splitlines()[0]
            return f"statement {i}/{len(stmts)} ({first!r}): {e}"
    return None


def check_ledger(ch: Engine, files) -> str | None:
    ch.execute(CREATE_LEDGER)
    ch.execute(CREATE_LEDGER)  # every start-up runs it
    expected = {}
    for version, path in files:
        checksum = 123 + version
        ch.execute(INSERT_LEDGER.format(version=version, name=path.name, checksum=checksum))
        expected[version] = (path.name, checksum)
    got = {}
    for r in ch.rows(READ_LEDGER):
        v, name, checksum = r.values()
        got[int(v)] = (name, int(checksum))
    return None if got == expected else f"ledger read back {got}, expected {expected}"


def insert_sample_data(ch: Engine) -> str | None:
    # chDB merges parts within milliseconds, which would collapse the old ad versions and the
    # per-insert aggregate states before anything reads them. Keep the parts apart, as on a busy
    # server, so argMax(…, version) and the -Merge combinators really have work to do.
    for table in ("ads", "events", "ad_stats_hourly"):
        ch.execute(f"SYSTEM STOP MERGES {table}")
    cols = "(id, name, video_url, target_url, active, created_at, updated_at, version)"
    for id_, name, active, created, updated, version in ADS:
        ch.execute(
            f"INSERT INTO ads {cols} VALUES ('{id_}', '{name}', 'https://cdn.example/{name}.mp4', "
            f"'https://example.com/{version}', {active}, '{created}', '{updated}', {version})"
        )
    events = sample_events()
    # Several inserts -> several parts (and MV blocks) whose states must merge correctly.
    for start in range(0, len(events), 90):
        ch.execute(
            "INSERT INTO events (event_id, ad_id, kind, event_time, received_at, ip_hash, playback_time, "
            "error_code, batch_id) VALUES " + ", ".join(events[start : start + 90])
        )
    got = ch.rows(
        "SELECT count() AS n, uniqExact(kind) AS kinds, uniqExact(ad_id) AS ads, "
        "uniqExact(toDate(event_time)) AS days, uniqExact(toStartOfHour(event_time)) AS hours, "
        "countIf(isNull(playback_time)) AS nulls, "
        "countIf(kind = 'click') - uniqExactIf(ip_hash, kind = 'click') AS repeat_clickers FROM events"
    )[0]
    want = {"n": str(len(events)), "kinds": str(len(KINDS)), "ads": "5", "days": "2", "hours": "6"}
    if any(got[k] != v for k, v in want.items()) or got["nulls"] == "0" or got["repeat_clickers"] == "0":
        return f"sample events look wrong: {got}"
    if ch.scalar("SELECT count() FROM ads") != str(len(ADS)):
        return "not every ads row arrived"
    return None


def merge_function(col_type: str) -> str:
    """AggregateFunction(uniqIf, UInt64, UInt8) -> uniqIfMerge"""
    m = re.fullmatch(r"AggregateFunction\((\w+)(?:,.*)?\)", col_type)
    if not m:
        raise ValueError(f"not an AggregateFunction column: {col_type}")
    return m.group(1) + "Merge"


def check_hourly_stats(ch: Engine) -> str | None:
    columns = ch.rows(
        f"SELECT name, type FROM system.columns WHERE database = '{DB}' AND table = 'ad_stats_hourly' "
        "ORDER BY position"
    )
    if not columns:
        return "ad_stats_hourly has no columns (does it exist?)"
    aggregates = {c["name"]: c["type"] for c in columns if c["name"] not in STATS_KEY}
    uncovered = sorted(set(aggregates) - set(RECOUNT))
    if uncovered:
        return f"column(s) {uncovered} of ad_stats_hourly have no recount in RECOUNT; add them"
    stale = sorted(set(RECOUNT) - set(aggregates))
    if stale:
        return f"RECOUNT names column(s) {stale} that ad_stats_hourly lacks"
    names = list(aggregates)
    merged = ", ".join(f"{merge_function(aggregates[c])}({c}) AS {c}" for c in names)
    recount = ", ".join(f"{RECOUNT[c]} AS {c}" for c in names)
    key = "ad_id, hour"
    mv = ch.rows(f"SELECT {key}, {merged} FROM ad_stats_hourly GROUP BY {key} ORDER BY {key}")
    raw = ch.rows(
        f"SELECT ad_id, toStartOfHour(event_time) AS hour, {recount} FROM events GROUP BY {key} ORDER BY {key}"
    )
    if not raw:
        return "no events to compare with"
    mv_by = {(r["ad_id"], r["hour"]): r for r in mv}
    raw_by = {(r["ad_id"], r["hour"]): r for r in raw}
    if mv_by.keys() != raw_by.keys():
        return f"(ad_id, hour) groups differ: only in MV {sorted(mv_by.keys() - raw_by.keys())[:3]}, only in events {sorted(raw_by.keys() - mv_by.keys())[:3]}"
    diffs = []
    for k, r in raw_by.items():
        for c in names:
            if abs(float(mv_by[k][c]) - float(r[c])) > 1e-6:
                diffs.append(f"{k} {c}: view {mv_by[k][c]} != recount {r[c]}")
    if diffs:
        return f"{len(diffs)} mismatch(es), e.g. " + "; ".join(diffs[:3])
    empty = [c for c in names if sum(float(r[c]) for r in raw) == 0]
    if empty:
        return f"sample data never exercises {empty}"
    return None


def prepare_query(path: Path) -> str:
    text = path.read_text()
    lines = text.splitlines()
    declared = [l for l in lines if re.match(r"\s*--\s*sample-params:", l)]
    if len(declared) > 1:
        raise ValueError("more than one sample-params line")
    params = split_literals(declared[0].split(":", 1)[1]) if declared else []
    sql = "\n".join(l for l in lines if not l.lstrip().startswith("--")).strip().rstrip(";").strip()
    if not sql:
        raise ValueError("no SQL outside comments")
    if ";" in sql:
        raise ValueError("more than one statement")
    # The Rust client sends the whole file and binds every `?` it finds, comments included
    # (clickhouse crate's SqlBuilder), so a `?` in a comment would swallow a parameter.
    for l in lines:
        if l.lstrip().startswith("--") and "?" in l.replace("??", ""):
            raise ValueError(f"`?` in a comment line is bound by the Rust client too; write `??`: {l.strip()!r}")
    if "?" in sql.replace("??", "") and not declared:
        raise ValueError("uses `?` parameters but has no `-- sample-params: ...` line")
    return bind(sql, params)


def expect_ads_active(rows) -> str | None:
    got = {r["id"]: r["latest_name"] for r in rows}
    if len(got) != len(rows):
        return f"an ad appears more than once: {[r['id'] for r in rows]}"
    if got != ACTIVE_NAMES:
        return f"returned {got}, expected the active ads with their newest names {ACTIVE_NAMES}"
    return None


def expect_ad_by_id(rows) -> str | None:
    if len(rows) != 1:
        return f"expected one row for {AD1}, got {len(rows)}"
    r = rows[0]
    if r.get("id") != AD1 or r.get("latest_name") != newest(AD1)[1]:
        return f"expected {AD1} named {newest(AD1)[1]!r}, got {r}"
    return None


def expect_ads_count(rows) -> str | None:
    want = len({a[0] for a in ADS})
    if len(rows) != 1 or [int(v) for v in rows[0].values()] != [want]:
        return f"expected [{want}], got {rows}"
    return None


EXPECTATIONS = {
    "ads_active.sql": expect_ads_active,
    "ad_by_id.sql": expect_ad_by_id,
    "ads_count.sql": expect_ads_count,
}


def check_query(ch: Engine, path: Path) -> str | None:
    rows = ch.rows(prepare_query(path))
    expect = EXPECTATIONS.get(path.name)
    return expect(rows) if expect else None


def main() -> int:
    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="adbeacon-chdb-") as tmp:
        ch = Engine(tmp)
        try:
            run_all(checks, ch)
        except Exception:
            checks.fail("harness", traceback.format_exc().strip().splitlines()[-1])
        finally:
            ch.close()
    total = checks.passed + checks.failed
    print(f"{checks.passed} passed, {checks.failed} failed")
    return 0 if total and not checks.failed else 1


def run_all(checks: Checks, ch: Engine) -> None:
    version = ch.scalar("SELECT version()")
    print(f"# chDB {version}, checking {ROOT}")

    def use_db() -> str | None:
        ch.execute(f"DROP DATABASE IF EXISTS {DB}")
        ch.execute(f"CREATE DATABASE {DB}")
        ch.execute(f"USE {DB}")
        current = ch.scalar("SELECT currentDatabase()")
        return None if current == DB else f"USE {DB} did not stick: currentDatabase() = {current}"

    if not checks.run(f"fresh database {DB}", use_db):
        return

    files = []

    def discover() -> str | None:
        files.extend(migration_files())
        return check_migration_files(files)

    if not checks.run("migrations discovered", discover):
        return
    for rnd in ("apply", "apply again"):
        results = [checks.run(f"migration {p.name} ({rnd})", apply_migration, ch, p) for _, p in files]
        if not all(results):
            return  # later checks need the whole schema
    checks.run("schema_migrations ledger", check_ledger, ch, files)

    if not checks.run("sample data", insert_sample_data, ch):
        return
    checks.run("ad_stats_hourly_mv matches a recount of events (unmerged parts)", check_hourly_stats, ch)

    def merge_stats() -> str | None:
        ch.execute("SYSTEM START MERGES ad_stats_hourly")
        ch.execute("OPTIMIZE TABLE ad_stats_hourly FINAL")
        return check_hourly_stats(ch)

    checks.run("ad_stats_hourly_mv matches a recount of events (after OPTIMIZE FINAL)", merge_stats)

    queries = sorted(QUERIES_DIR.glob("*.sql"))
    if not queries:
        checks.fail("queries discovered", f"no queries in {QUERIES_DIR}")
    for name in sorted(set(EXPECTATIONS) - {q.name for q in queries}):
        print(f"# note: {name} is gone; its result check is unused")
    for q in queries:
        checks.run(f"query {q.name}", check_query, ch, q)


if __name__ == "__main__":
    sys.exit(main())
