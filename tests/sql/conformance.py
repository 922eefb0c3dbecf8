"""SQL conformance check against the current ClickHouse engine, through chDB.

Why this exists: adbeacon's SQL (clickhouse/migrations/*.sql and clickhouse/queries/*.sql) must
run unchanged on two ClickHouse generations. Dev machines can only install ClickHouse 18.16, which
is what the Rust integration tests (tests/it) run against; production runs a current ClickHouse.
chDB embeds the current engine in-process, so this script proves the other half without a server:

  * every migration applies, in order, into a fresh database, and applies a second time
    (they are all IF NOT EXISTS: "safe to apply twice");
  * the schema_migrations ledger statements the service runs (src/store/migrate.rs) work;
  * sample events fed through the materialized views land in every aggregate table
    (ad_stats_minutely, ad_stats_hourly, ad_stats_daily) with exactly the numbers a recount from
    raw `events` gives, while the inserts' parts are still apart and again after OPTIMIZE FINAL;
    likewise ad_counts (migration 0008), in both its grains ('minute' and 'hour'): its counts
    array decoded (counts[1] valid clicks with a playback position, counts[1 + 15 * traffic + kind]
    the events of that traffic and kind), unique clicks and the playback sum, valid and filtered
    traffic alike;
  * 0008's own INSERTs, run where ad_stats_hourly, ad_stats_minutely and ad_filtered_minutely
    already hold events and ad_counts did not exist yet, fill ad_counts with exactly a recount
    (both grains); 0008 applied a second time changes nothing; later events count once;
  * the window queries (ad_series.sql with its totals row, ads_totals.sql) give, for hand-picked and
    deterministic-random windows [from, to), exactly what a recount of raw `events` in the window
    gives (ad_series.sql: every hour row and the totals, its counts array decoded, so every valid
    count and every filtered reason and kind); their parameters are computed by window_params()
    like the service computes them and bound in the order each file's header documents;
  * every clickhouse/queries/*.sql runs on the sample data (parameters come from the file's
    `-- sample-params: ...` line) and, for the queries the service depends on, answers sensibly.
    clickhouse/queries/ad_filtered.sql is gone: filtered traffic by reason and kind now comes from
    ad_series.sql's counts (positions 17..61), whose sample run must equal the raw filtered events;
  * every ```sql block of docs/analysts.md runs and returns rows; a block whose first line reads
    `-- The same rows from raw events ...` must return what the block before it (same section)
    returned. ```sql backfill blocks are run where they are meant for (a database whose newer
    aggregate tables, ad_counts included, were created after its events were stored), a block
    `TRUNCATE TABLE ad_counts` followed by the `INSERT INTO ad_counts` statements of 0008 as the
    doc tells the reader; every ad_stats_* table and ad_counts (both grains) must then equal a
    recount; the ```sql retention block is run on that database too and must leave the
    aggregates (ad_counts included) untouched.
  * clickhouse/dedup/enable.sql (current engine only): an INSERT repeated with its deduplication
    token is stored once in events and counted once in every aggregate table, ad_counts included.

  * the ClickHouse SQL of the Grafana dashboards (deploy/grafana/dashboards/*.json, `rawSql`)
    runs with the plugin's macros expanded; "Top ads by CTR" equals a recount of valid raw events.

Files are discovered by globbing, so new migrations and queries are covered without editing this.

Run:   .data/venv/bin/python tests/sql/conformance.py     (`make test` runs it too)
       .data/venv/bin/python tests/sql/conformance.py --server http://127.0.0.1:8123
           runs the same checks over HTTP against a real server (e.g. the local ClickHouse 18.16)
           in a scratch database `conformance_<pid>` that is dropped at the end.
Env:   ADBEACON_ROOT=/path/to/checkout  to check another tree (default: this script's repository).
       CONFORMANCE_SERVER=http://host:8123  same as --server.
Output: `ok   <check>` / `FAIL <check>: <reason>` per check, then `N passed, M failed`.
Exit:  0 when everything passed, 1 on any failure or when no check ran.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import tempfile
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path


def server_url() -> str | None:
    args = sys.argv[1:]
    if args[:1] == ["--server"] and len(args) == 2:
        return args[1]
    if args:
        print(f"usage: {sys.argv[0]} [--server http://host:8123]")
        sys.exit(2)
    return os.environ.get("CONFORMANCE_SERVER") or None


SERVER = server_url()

if SERVER is None:
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
ANALYSTS_DOC = ROOT / "docs" / "analysts.md"
DB = "conformance" if SERVER is None else f"conformance_{os.getpid()}"

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

# How to recount every aggregate column of the ad_stats_* tables from raw `events`. A column of a
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
# Sums of Float32 positions: compared within this; every other column is a count, compared exactly.
FLOAT_COLUMNS = {"click_playback_sum": 1e-6}

# Every aggregate table: (table, its time-bucket column, the bucket of an event's event_time).
# An ad_stats_* table of the schema missing here fails the check.
STATS_TABLES = [
    ("ad_stats_minutely", "minute", "toStartOfMinute(event_time)"),
    ("ad_stats_hourly", "hour", "toStartOfHour(event_time)"),
    ("ad_stats_daily", "day", "toStartOfDay(event_time)"),
]

# --- sample data -----------------------------------------------------------------------------

AD1 = "11111111-1111-1111-1111-111111111111"  # three versions, inserted out of order; active
AD2 = "22222222-2222-2222-2222-222222222222"  # active at first, deactivated by its newest version
AD3 = "33333333-3333-3333-3333-333333333333"  # one version, active
AD4 = "44444444-4444-4444-4444-444444444444"  # one version, never active
AD5 = "55555555-5555-5555-5555-555555555555"  # one version, active, never has an event
UNKNOWN_AD = "99999999-9999-9999-9999-999999999999"  # events for an ad the catalog doesn't hold
# Each id repeats one hex digit, so their text order is also the engine's UUID order (which is
# not the text order in general): ads_totals.sql's `ORDER BY …, id` can be predicted here.

# (id, name, active, created_at, updated_at, version), in insertion order.
ADS = [
    (AD1, "ad one v1", 1, "2024-03-01 10:00:00", "2024-03-01 10:00:00", 1),
    (AD1, "ad one v3", 1, "2024-03-01 10:00:00", "2024-03-05 09:00:00", 3),
    (AD1, "ad one v2", 0, "2024-03-01 10:00:00", "2024-03-03 08:00:00", 2),
    (AD2, "ad two v1", 1, "2024-03-02 10:00:00", "2024-03-02 10:00:00", 1),
    (AD2, "ad two v2", 0, "2024-03-02 10:00:00", "2024-03-04 10:00:00", 2),
    (AD3, "ad three", 1, "2024-02-28 12:00:00", "2024-02-28 12:00:00", 1),
    (AD4, "ad four", 0, "2024-03-06 12:00:00", "2024-03-06 12:00:00", 1),
    (AD5, "ad five", 1, "2024-03-07 12:00:00", "2024-03-07 12:00:00", 1),
]
CATALOG = sorted({a[0] for a in ADS})


def newest(ad_id: str) -> tuple:
    return max((a for a in ADS if a[0] == ad_id), key=lambda a: a[5])


ACTIVE_NAMES = {i: newest(i)[1] for i in CATALOG if newest(i)[2] == 1}

UTC = timezone.utc
SPREAD_START = datetime(2024, 3, 27, tzinfo=UTC)  # spread_events() covers 8 whole UTC days
SPREAD_DAYS = 8


def event_tuple(event_id, ad, kind, t, received, ip_hash, playback, error_code, batch, traffic="valid") -> str:
    """One VALUES tuple for `events` (columns as in insert_events)."""
    return (
        f"('{event_id}', '{ad}', '{kind}', '{t:%Y-%m-%d %H:%M:%S}', '{received:%Y-%m-%d %H:%M:%S}', "
        f"{ip_hash}, {playback}, {error_code}, '{batch}', '{traffic}')"
    )


# Filtered traffic in the samples: every FILTERED_EVERY-th sample event is stored flagged, the
# reasons in turn. The aggregates behind the net numbers must leave them out; ad_filtered_minutely
# must count them.
FILTERED_EVERY = 7
FILTERED_REASONS = ["duplicate", "bot", "empty_user_agent"]


def sample_traffic(i: int) -> str:
    """The traffic flag of sample event number `i`."""
    if i % FILTERED_EVERY != 3:
        return "valid"
    return FILTERED_REASONS[(i // FILTERED_EVERY) % len(FILTERED_REASONS)]


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
            f"'{uuid.UUID(int=i // 90 + 1)}', '{sample_traffic(i)}')"
        )
    return rows


def spread_events(n: int = 1200) -> list[str]:
    """VALUES tuples for `events` over 8 whole UTC days (27 March to 3 April 2024, across the month
    and partition boundary), so that windows holding whole days exist: kinds weighted like a
    real funnel (impressions > starts > quartiles > completes), busier ads first, client IPs that
    repeat across hours and days, and about 1 in 20 events arriving 1 to 30 hours late
    (received_at well after event_time)."""
    rng = random.Random(20240327)
    weights = {
        "impression": 30, "start": 20, "first_quartile": 16, "midpoint": 12, "third_quartile": 9,
        "complete": 7, "click": 12, "creative_view": 4, "skip": 3, "pause": 2, "resume": 2,
        "mute": 1, "unmute": 1, "close": 2, "error": 1,
    }  # fmt: skip
    kinds, kind_weights = list(weights), list(weights.values())
    ads, ad_weights = [AD1, AD2, AD3, AD4, UNKNOWN_AD], [8, 4, 6, 1, 1]
    rows = []
    for i in range(n):
        kind = rng.choices(kinds, kind_weights)[0]
        ad = rng.choices(ads, ad_weights)[0]
        t = SPREAD_START + timedelta(seconds=rng.randrange(SPREAD_DAYS * 86400))
        late = rng.random() < 0.05
        received = t + (timedelta(hours=rng.randrange(1, 31)) if late else timedelta(seconds=rng.randrange(3)))
        playback = "NULL" if rng.random() < 0.2 else repr(rng.randrange(0, 120) / 4)
        error_code = rng.choice([100, 303, 400, 901]) if kind == "error" else 0
        rows.append(
            event_tuple(
                uuid.UUID(int=rng.getrandbits(128)), ad, kind, t, received, rng.randrange(1, 60),
                playback, error_code, uuid.UUID(int=1000 + i // 150), sample_traffic(i),
            )
        )  # fmt: skip
    return rows


# Instants on (and one second before) minute, hour, day and month edges, among them the two ends
# of the sample window of the window queries (21:17 on 31 March to 02:43 on 1 April).
EDGE_INSTANTS = [
    "2024-03-29 00:00:00", "2024-03-28 23:59:59", "2024-03-31 00:00:00", "2024-03-30 23:59:59",
    "2024-04-01 00:00:00", "2024-03-31 23:59:59", "2024-04-03 00:00:00", "2024-04-02 23:59:59",
    "2024-03-31 22:00:00", "2024-03-31 21:59:59", "2024-04-01 01:00:00", "2024-04-01 00:59:59",
    "2024-04-02 13:00:00", "2024-04-02 12:59:59", "2024-03-31 21:17:00", "2024-03-31 21:16:59",
    "2024-04-01 02:43:00", "2024-04-01 02:42:59", "2024-03-30 10:15:00", "2024-03-30 10:14:59",
]  # fmt: skip


def edge_events() -> tuple[list[str], list[str]]:
    """Two inserts' worth of events at EDGE_INSTANTS: the same (ad, minute) keys in both, so that
    even ad_stats_minutely holds several unmerged rows per key."""
    rng = random.Random(20240401)
    first, second = [], []
    others = [AD2, AD3, UNKNOWN_AD]
    for i, text in enumerate(EDGE_INSTANTS):
        t = datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        batch = uuid.UUID(int=2000 + i)

        def row(ad, kind, ip, playback="2.5"):
            return event_tuple(uuid.UUID(int=rng.getrandbits(128)), ad, kind, t, t, ip, playback, 0, batch)

        first.append(row(AD1, "click", 100 + i % 7))
        first.append(row(others[i % 3], "impression", 100 + i % 5))
        second.append(row(AD1, "impression", 100 + i % 7, "NULL"))
        second.append(row(others[i % 3], "click", 100 + i % 5))
        second.append(row(AD1, "click", 100 + i % 7, "7.25"))  # a repeat clicker in the same minute
    return first, second


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

    def describe(self) -> str:
        return f"chDB {self.scalar('SELECT version()')}"

    def use(self, db: str) -> None:
        self.execute(f"USE {db}")

    def execute(self, sql: str, fmt: str = "TabSeparatedWithNames") -> str:
        res = self.s.query(sql, fmt)
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

    def rows_and_totals(self, sql: str, names: list[str]) -> tuple[list[dict[str, str]], dict[str, str]]:
        """The rows and the totals row of a `WITH TOTALS` query whose columns are `names`, read
        from plain TabSeparated (rows, a blank line, the totals) as the service reads them: the
        formats with a header misplace the totals on current servers when there are no rows."""
        text = self.execute(sql, "TabSeparated")
        rows, sep, totals = ("", "\n", text[1:]) if text.startswith("\n") else text.partition("\n\n")
        if not sep:
            raise AssertionError(f"no blank line before a totals row in {text[:200]!r}")
        lines = [l.split("\t") for l in rows.split("\n") if l] + [totals.rstrip("\n").split("\t")]
        if any(len(l) != len(names) for l in lines):
            raise AssertionError(f"expected {len(names)} columns {names}, got lines {lines[:2]}")
        dicts = [dict(zip(names, l)) for l in lines]
        return dicts[:-1], dicts[-1]

    def scalar(self, sql: str) -> str:
        rows = self.rows(sql)
        if len(rows) != 1 or len(rows[0]) != 1:
            raise AssertionError(f"expected one value from {sql!r}, got {rows}")
        return next(iter(rows[0].values()))

    def close(self) -> None:
        self.s.close()


class HttpEngine(Engine):
    """A ClickHouse server over HTTP (any version, 18.16 included); same interface as Engine."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.db = "default"
        self.created: list[str] = []

    def describe(self) -> str:
        return f"ClickHouse server {self.scalar('SELECT version()')} at {self.url}"

    def use(self, db: str) -> None:
        self.db = db  # HTTP is stateless: the database goes with every request

    def execute(self, sql: str, fmt: str = "TabSeparatedWithNames") -> str:
        m = re.fullmatch(r"\s*CREATE DATABASE (\w+)\s*", sql)
        if m:
            self.created.append(m.group(1))
        query = urllib.parse.urlencode({"database": self.db, "default_format": fmt})
        req = urllib.request.Request(f"{self.url}/?{query}", data=sql.encode())
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError as e:
            raise RuntimeError(e.read().decode(errors="replace").strip()) from None

    def close(self) -> None:
        """Drops the scratch databases this run created."""
        self.db = "default"
        for db in self.created:
            try:
                self.execute(f"DROP DATABASE IF EXISTS {db}")
            except Exception as e:
                print(f"# note: could not drop {db}: {e}")


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


def ts(text: str) -> int:
    """'2024-03-31 21:17' (UTC) -> unix seconds."""
    return int(datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=UTC).timestamp())


def fmt_ts(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M")


def numbers_differ(got: str, want: str, tolerance: float = 0.0) -> bool:
    try:
        return abs(float(got) - float(want)) > tolerance
    except ValueError:
        return got != want


def column_diffs(got: dict, want: dict, columns, label: str = "") -> list[str]:
    """`got` against `want` for every column: counts exactly, FLOAT_COLUMNS within tolerance."""
    return [
        f"{label}{c}: query {got.get(c)} != recount {want[c]}"
        for c in columns
        if c not in got or numbers_differ(got[c], want[c], FLOAT_COLUMNS.get(c, 0.0))
    ]


# --- migrations and the aggregate tables -----------------------------------------------------


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
            # As src/store/migrate.rs: ADD COLUMN of a column that exists is done already (no
            # server of ours has ADD COLUMN IF NOT EXISTS... 18.16 lacks it).
            if st.upper().startswith("ALTER TABLE") and " ADD COLUMN " in st.upper() and "already exists" in str(e):
                continue
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


def stop_merges(ch: Engine, db: str) -> None:
    # chDB merges parts within milliseconds, which would collapse the old ad versions and the
    # per-insert aggregate states before anything reads them. Keep the parts apart, as on a busy
    # server, so argMax(…, version) and the -Merge combinators really have work to do.
    tables = ch.rows(f"SELECT name FROM system.tables WHERE database = '{db}' AND engine LIKE '%MergeTree'")
    for t in tables:
        ch.execute(f"SYSTEM STOP MERGES {t['name']}")


def insert_events(ch: Engine, rows: list[str], per_insert: int = 90) -> None:
    """Several inserts -> several parts (and MV blocks) whose states must merge correctly. On a
    schema from before migration 0007 (no `traffic` column) the rows go in without their flag."""
    columns = "event_id, ad_id, kind, event_time, received_at, ip_hash, playback_time, error_code, batch_id"
    if any(c["name"] == "traffic" for c in ch.rows("DESCRIBE TABLE events")):
        columns += ", traffic"
    else:
        rows = [re.sub(r", '\w+'\)$", ")", r) for r in rows]
    for start in range(0, len(rows), per_insert):
        ch.execute(f"INSERT INTO events ({columns}) VALUES " + ", ".join(rows[start : start + per_insert]))


def all_sample_events() -> list[list[str]]:
    """Every sample event, in the insert groups insert_sample_data uses."""
    first, second = edge_events()
    return [sample_events(), spread_events(), first, second]


def insert_sample_data(ch: Engine) -> str | None:
    cols = "(id, name, video_url, target_url, active, created_at, updated_at, version)"
    for id_, name, active, created, updated, version in ADS:
        ch.execute(
            f"INSERT INTO ads {cols} VALUES ('{id_}', '{name}', 'https://cdn.example/{name}.mp4', "
            f"'https://example.com/{version}', {active}, '{created}', '{updated}', {version})"
        )
    groups = all_sample_events()
    for rows, per_insert in zip(groups, (90, 400, len(groups[2]), len(groups[3]))):
        insert_events(ch, rows, per_insert)
    n = sum(len(g) for g in groups)
    got = ch.rows(
        "SELECT count() AS n, uniqExact(kind) AS kinds, uniqExact(ad_id) AS ads, "
        "uniqExact(toDate(event_time)) AS days, uniqExact(toYYYYMM(event_time)) AS months, "
        "countIf(event_time >= toDateTime('2024-03-31 21:00:00', 'UTC') "
        "    AND event_time < toDateTime('2024-04-01 03:00:00', 'UTC')) AS dense, "
        "countIf(isNull(playback_time)) AS nulls, "
        "countIf(kind = 'click') - uniqExactIf(ip_hash, kind = 'click') AS repeat_clickers, "
        "countIf(received_at >= event_time + 3600) AS late, "
        "countIf(toStartOfDay(event_time) = event_time) AS on_day_edge, "
        "countIf(toStartOfHour(event_time) = event_time AND toStartOfDay(event_time) != event_time) AS on_hour_edge, "
        "countIf(toStartOfMinute(event_time) = event_time AND toStartOfHour(event_time) != event_time) AS on_minute_edge "
        "FROM events"
    )[0]
    want = {"n": str(n), "kinds": str(len(KINDS)), "ads": "5", "days": str(SPREAD_DAYS), "months": "2"}
    positive = ["dense", "nulls", "repeat_clickers", "late", "on_day_edge", "on_hour_edge", "on_minute_edge"]
    if any(got[k] != v for k, v in want.items()) or any(int(got[k]) == 0 for k in positive):
        return f"sample events look wrong: {got}, expected {want} and {positive} > 0"
    if int(got["dense"]) < len(groups[0]):
        return f"the 6-hour block from 21:00 on 31 March holds {got['dense']} events, fewer than {len(groups[0])}"
    if ch.scalar("SELECT count() FROM ads") != str(len(ADS)):
        return "not every ads row arrived"
    return None


def merge_function(col_type: str) -> str:
    """AggregateFunction(uniqIf, UInt64, UInt8) -> uniqIfMerge. Current servers print the state's
    version first for functions that have several (AggregateFunction(1, sumMapIf, ...))."""
    m = re.fullmatch(r"AggregateFunction\((?:\d+, *)?(\w+)(?:,.*)?\)", col_type)
    if not m:
        raise ValueError(f"not an AggregateFunction column: {col_type}")
    return m.group(1) + "Merge"


def check_stats_tables_listed(ch: Engine, db: str) -> str | None:
    found = {r["name"] for r in ch.rows(f"SELECT name FROM system.tables WHERE database = '{db}'")}
    stats = {t for t in found if t.startswith("ad_stats_") and not t.endswith("_mv")}
    listed = {t for t, _, _ in STATS_TABLES}
    if stats - listed:
        return f"table(s) {sorted(stats - listed)} have no entry in STATS_TABLES; add them"
    if listed - stats:
        return f"STATS_TABLES names table(s) {sorted(listed - stats)} that the migrations do not create"
    return None


def compare_groups(table: dict, raw: dict, key: str, names) -> str | None:
    """Why a table's rows by group differ from the recount's (same groups, same `names`), if they do."""
    if table.keys() != raw.keys():
        return (
            f"{key} groups differ: only in the table {sorted(table.keys() - raw.keys())[:3]}, "
            f"only in events {sorted(raw.keys() - table.keys())[:3]}"
        )
    diffs = []
    for k, r in raw.items():
        diffs += column_diffs(table[k], r, names, f"{k} ")
    if diffs:
        return f"{len(diffs)} mismatch(es), e.g. " + "; ".join(diffs[:3])
    return None


def check_stats(ch: Engine, table: str, bucket: str, bucket_expr: str, several_rows_per_key: bool) -> str | None:
    """The table, read with -Merge, equals a recount of `events` grouped by ad and bucket."""
    columns = ch.rows(f"DESCRIBE TABLE {table}")
    if not columns:
        return f"{table} has no columns (does it exist?)"
    key = ("ad_id", bucket)
    if [c["name"] for c in columns[:2]] != list(key):
        return f"{table} should start with the key columns {key}, has {[c['name'] for c in columns]}"
    aggregates = {c["name"]: c["type"] for c in columns if c["name"] not in key}
    uncovered = sorted(set(aggregates) - set(RECOUNT))
    if uncovered:
        return f"column(s) {uncovered} of {table} have no recount in RECOUNT; add them"
    stale = sorted(set(RECOUNT) - set(aggregates))
    if stale:
        return f"RECOUNT names column(s) {stale} that {table} lacks"
    if several_rows_per_key:
        rows, keys = ch.rows(f"SELECT count() AS rows, uniqExact(ad_id, {bucket}) AS keys FROM {table}")[0].values()
        if int(rows) <= int(keys):
            return f"{table} holds {rows} rows for {keys} keys: the parts were merged, so GROUP BY goes untested"
    names = list(aggregates)
    merged = ", ".join(f"{merge_function(aggregates[c])}({c}) AS {c}" for c in names)
    recount = ", ".join(f"{RECOUNT[c]} AS {c}" for c in names)
    order = f"ad_id, {bucket}"
    mv = ch.rows(f"SELECT {order}, {merged} FROM {table} GROUP BY {order} ORDER BY {order}")
    raw = ch.rows(
        f"SELECT ad_id, {bucket_expr} AS {bucket}, {recount} FROM events WHERE traffic = 'valid' "
        f"GROUP BY {order} ORDER BY {order}"
    )
    if not raw:
        return "no events to compare with"
    mv_by = {(r["ad_id"], r[bucket]): r for r in mv}
    raw_by = {(r["ad_id"], r[bucket]): r for r in raw}
    failure = compare_groups(mv_by, raw_by, f"(ad_id, {bucket})", names)
    if failure:
        return failure
    empty = [c for c in names if sum(float(r[c]) for r in raw) == 0]
    if empty:
        return f"sample data never exercises {empty}"
    return None


# --- ad_counts (migration 0008) --------------------------------------------------------------

# The `traffic` values of `events` in the order of their Enum8 numbers (valid 0, duplicate 1, bot 2,
# empty_user_agent 3); kinds are numbered from 1 in the order of KINDS.
TRAFFIC = ["valid", *FILTERED_REASONS]
# ad_counts' counts array as 0008_ad_counts.sql documents it: counts[1] is valid clicks with a
# playback position, counts[1 + 15 * traffic + kind] the events of that traffic and kind. The
# valid positions are named like RECOUNT's columns, the filtered ones "<reason> <kind>".
FILTERED_COLUMNS = [f"{reason} {kind}" for reason in FILTERED_REASONS for kind in KINDS]
COUNT_POSITIONS = (
    {"click_playback_count": 1}
    | {f"{kind}s": 1 + k for k, kind in enumerate(KINDS, 1)}  # impressions, clicks, …, errors
    | {
        f"{TRAFFIC[t]} {kind}": 1 + len(KINDS) * t + k
        for t in range(1, len(TRAFFIC))
        for k, kind in enumerate(KINDS, 1)
    }
)
COUNTS_LENGTH = 1 + len(KINDS) * len(TRAFFIC)  # 61
# Every number a decoded ad_counts (or ad_series.sql) row holds: RECOUNT's, then the filtered ones.
COUNTED = [*RECOUNT, *FILTERED_COLUMNS]
# A group without events: every COUNTED number 0, no errors by code.
ZERO = {c: "0" for c in COUNTED} | {"error_codes": ""}
# ad_counts' columns, in order; a column added by a migration fails check_ad_counts until it is
# recounted here.
AD_COUNTS_COLUMNS = ["ad_id", "grain", "t", "counts", "unique_clicks", "click_playback_sum", "error_codes"]
# Each grain of ad_counts with the bucket of an event's event_time.
AD_COUNTS_GRAINS = [("minute", "toStartOfMinute(event_time)"), ("hour", "toStartOfHour(event_time)")]


def canonical_error_codes(text: str) -> str:
    """A merged `error_codes` ((codes, counts), as sumMapIfMerge prints it) as `code:count` pairs by
    code, like recount_all_traffic's; raises on a malformed or unpaired tuple or a zero count."""
    m = re.fullmatch(r"\(\[([0-9,]*)\],\[([0-9,]*)\]\)", text)
    if not m:
        raise AssertionError(f"error_codes {text[:120]!r} is not a (codes, counts) tuple")
    codes, counts = ([int(x) for x in g.split(",")] if g else [] for g in m.groups())
    if len(codes) != len(counts) or codes != sorted(set(codes)) or 0 in counts:
        raise AssertionError(f"error_codes {text[:120]!r}: codes not ascending and paired with non-zero counts")
    return " ".join(f"{c}:{n}" for c, n in zip(codes, counts))


def decode_counts(row: dict[str, str]) -> dict[str, str]:
    """A row of merged ad_counts columns (counts, unique_clicks, click_playback_sum, error_codes) as
    numbers named like COUNTED: the counts array decoded by COUNT_POSITIONS, positions past the end
    of a shorter array 0; and `error_codes` by canonical_error_codes."""
    counts = json.loads(row["counts"])
    if (
        not isinstance(counts, list)
        or len(counts) > COUNTS_LENGTH
        or any(not isinstance(c, int) or c < 0 for c in counts)
    ):
        raise AssertionError(f"counts {row['counts'][:120]} is not an array of at most {COUNTS_LENGTH} counts")
    counts += [0] * (COUNTS_LENGTH - len(counts))
    decoded = {name: str(counts[p - 1]) for name, p in COUNT_POSITIONS.items()}
    decoded |= {"unique_clicks": row["unique_clicks"], "click_playback_sum": row["click_playback_sum"]}
    return decoded | {"error_codes": canonical_error_codes(row["error_codes"])}


def recount_all_traffic(ch: Engine, group: list[tuple[str, str]], where: str = "1") -> dict[tuple, dict[str, str]]:
    """A recount of raw `events` matching `where`, grouped by `group` ((alias, expression) pairs),
    of everything ad_counts counts: RECOUNT over the valid events, every FILTERED_COLUMNS count, and
    the valid errors by code as `error_codes` (canonical_error_codes' form, "" without errors).
    Keyed by the group's values; a group with only filtered (only valid) events gets zeros for
    RECOUNT (FILTERED_COLUMNS)."""
    select = ", ".join(f"{expr} AS {alias}" for alias, expr in group)
    by = ", ".join(alias for alias, _ in group)
    recount = ", ".join(f"{RECOUNT[c]} AS {c}" for c in RECOUNT)
    out: dict[tuple, dict[str, str]] = {}
    for r in ch.rows(f"SELECT {select}, {recount} FROM events WHERE ({where}) AND traffic = 'valid' GROUP BY {by}"):
        out[tuple(r[a] for a, _ in group)] = ZERO | {c: r[c] for c in RECOUNT}
    for r in ch.rows(
        f"SELECT {select}, traffic, kind, count() AS events FROM events WHERE ({where}) AND traffic != 'valid' "
        f"GROUP BY {by}, traffic, kind"
    ):
        numbers = out.setdefault(tuple(r[a] for a, _ in group), dict(ZERO))
        numbers[f"{r['traffic']} {r['kind']}"] = r["events"]
    for r in ch.rows(
        f"SELECT {select}, error_code, count() AS errors FROM events WHERE ({where}) AND traffic = 'valid' "
        f"AND kind = 'error' GROUP BY {by}, error_code ORDER BY error_code"
    ):
        numbers = out[tuple(r[a] for a, _ in group)]  # the valid errors made the group above
        numbers["error_codes"] = " ".join(filter(None, [numbers["error_codes"], f"{r['error_code']}:{r['errors']}"]))
    return out


def error_code_diffs(got: dict, want: dict, label: str = "") -> list[str]:
    """`got`'s errors by code against `want`'s (both canonical_error_codes' form)."""
    if got.get("error_codes") == want["error_codes"]:
        return []
    return [f"{label}error_codes: query {got.get('error_codes')!r} != recount {want['error_codes']!r}"]


def read_ad_counts(ch: Engine) -> list[dict[str, str]]:
    """ad_counts read with -Merge per (ad_id, grain, t), in key order, the counts array as it is."""
    types = {c["name"]: c["type"] for c in ch.rows("DESCRIBE TABLE ad_counts")}
    merged = ", ".join(f"{merge_function(types[c])}({c}) AS {c}" for c in AD_COUNTS_COLUMNS[3:])
    return ch.rows(f"SELECT ad_id, grain, t, {merged} FROM ad_counts GROUP BY ad_id, grain, t ORDER BY ad_id, grain, t")


def check_ad_counts(ch: Engine, several_rows_per_key: bool, filtered: bool = True) -> str | None:
    """ad_counts, read with -Merge and its counts array decoded, equals a recount of `events` (valid
    and filtered traffic) grouped by ad and bucket, in both grains. With `filtered` False the events
    need not include filtered traffic (a database whose events predate migration 0007's `traffic`
    column holds valid events only); the filtered counts are still compared."""
    columns = [c["name"] for c in ch.rows("DESCRIBE TABLE ad_counts")]
    if columns != AD_COUNTS_COLUMNS:
        return f"ad_counts has columns {columns}, this check recounts {AD_COUNTS_COLUMNS}; teach it the new ones"
    placed = set(COUNT_POSITIONS) | {"unique_clicks", "click_playback_sum"}
    if placed != set(COUNTED):
        return f"RECOUNT column(s) {sorted(set(COUNTED) - placed)} have no place in ad_counts (COUNT_POSITIONS)"
    if several_rows_per_key:
        rows, keys = ch.rows("SELECT count() AS rows, uniqExact(ad_id, grain, t) AS keys FROM ad_counts")[0].values()
        if int(rows) <= int(keys):
            return f"ad_counts holds {rows} rows for {keys} keys: the parts were merged, so GROUP BY goes untested"
    table = {(r["ad_id"], r["grain"], r["t"]): decode_counts(r) for r in read_ad_counts(ch)}
    raw = {}
    for grain, expr in AD_COUNTS_GRAINS:
        for (ad, t), numbers in recount_all_traffic(ch, [("ad_id", "ad_id"), ("t", expr)]).items():
            raw[(ad, grain, t)] = numbers
    if not raw:
        return "no events to compare with"
    failure = compare_groups(table, raw, "(ad_id, grain, t)", COUNTED)
    if failure:
        return failure
    diffs = [d for k, r in raw.items() for d in error_code_diffs(table[k], r, f"{k} ")]
    if diffs:
        return f"{len(diffs)} mismatch(es), e.g. " + "; ".join(diffs[:3])
    empty = [c for c in RECOUNT if sum(float(r[c]) for r in raw.values()) == 0]
    if all(r["error_codes"].count(":") < 2 for r in raw.values()):
        empty.append("a bucket with errors of two codes")
    empty += [
        f"{reason} events"
        for reason in (FILTERED_REASONS if filtered else [])
        if sum(int(r[f"{reason} {kind}"]) for r in raw.values() for kind in KINDS) == 0
    ]
    if empty:
        return f"sample data never exercises {empty}"
    return None


# --- query files -----------------------------------------------------------------------------


def read_query(path: Path) -> tuple[str, list[str]]:
    """The file's SQL (comment lines dropped, `?` unbound) and its sample params."""
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
    return sql, params


def prepare_query(path: Path) -> str:
    return bind(*read_query(path))


def expect_ads_active(ch: Engine, rows) -> str | None:
    got = {r["id"]: r["latest_name"] for r in rows}
    if len(got) != len(rows):
        return f"an ad appears more than once: {[r['id'] for r in rows]}"
    if got != ACTIVE_NAMES:
        return f"returned {got}, expected the active ads with their newest names {ACTIVE_NAMES}"
    return None


def expect_ad_by_id(ch: Engine, rows) -> str | None:
    if len(rows) != 1:
        return f"expected one row for {AD1}, got {len(rows)}"
    r = rows[0]
    if r.get("id") != AD1 or r.get("latest_name") != newest(AD1)[1]:
        return f"expected {AD1} named {newest(AD1)[1]!r}, got {r}"
    return None


def expect_ads_count(ch: Engine, rows) -> str | None:
    want = len(CATALOG)
    if len(rows) != 1 or [int(v) for v in rows[0].values()] != [want]:
        return f"expected [{want}], got {rows}"
    return None


# What src/store/clickhouse.rs (EVENTS_LAYOUT) checks `events` for before every INSERT: each column
# adbeacon writes, with its type as RowBinary lays it out (layout_of: an Enum's values and a
# DateTime's zone left out). On the migrated schema every one must match, or no INSERT is sent.
EVENTS_LAYOUT = {
    "event_id": "UUID", "ad_id": "UUID", "kind": "Enum8", "event_time": "DateTime",
    "received_at": "DateTime", "ip_hash": "UInt64", "playback_time": "Nullable(Float32)",
    "error_code": "UInt16", "batch_id": "UUID", "traffic": "Enum8",
}


def layout_of(column_type: str) -> str:
    t = "".join(column_type.split())
    if t.startswith("Nullable(") and t.endswith(")"):
        return f"Nullable({layout_of(t[len('Nullable('):-1])})"
    for family in ("Enum8(", "Enum16(", "DateTime("):
        if t.startswith(family):
            return family[:-1]
    return t


def expect_events_columns(ch: Engine, rows) -> str | None:
    found = {r["name"]: layout_of(r["type"]) for r in rows}
    wrong = {n: found.get(n) for n, t in EVENTS_LAYOUT.items() if found.get(n) != t}
    return f"columns whose layout differs from what adbeacon writes: {wrong}" if wrong else None


def expect_first_event_day(ch: Engine, rows) -> str | None:
    want = ch.scalar("SELECT toUInt32(toStartOfDay(min(event_time))) FROM events WHERE traffic = 'valid'")
    if len(rows) != 1 or list(rows[0].values()) != [want]:
        return f"expected [{want}] ({fmt_ts(int(want))}, the day of the first event), got {rows}"
    return None


def expect_ad_series(ch: Engine, rows) -> str | None:
    """ad_series.sql over its sample window: the totals row's filtered positions (17..61 of the
    counts array) equal the flagged events of raw `events`, by reason and kind, and its errors by
    code equal the valid error events'."""
    path = QUERIES_DIR / "ad_series.sql"
    sql, sample = read_query(path)
    named = dict(zip(documented_params(path), sample))  # h_from and h_to appear twice, alike
    ad, from_ts, to_ts = named["ad"], int(named["from"]), int(named["to"])
    want = ch.rows(
        f"SELECT traffic AS reason, kind, count() AS events FROM events WHERE ad_id = toUUID({ad}) "
        f"AND traffic != 'valid' AND event_time >= toDateTime({from_ts}) AND event_time < toDateTime({to_ts}) "
        "GROUP BY reason, kind ORDER BY reason, kind"
    )
    if len({r["reason"] for r in want}) < len(FILTERED_REASONS):
        return f"the sample window lacks some filtered reasons ({want}); the check would prove little"
    if not rows:
        return "no rows for the sample window"
    # `rows` came with a header, which misplaces the totals; read them as the service does.
    _, totals = ch.rows_and_totals(bind(sql, sample), SERIES_COLUMNS)
    decoded = decode_counts(totals)
    got = [
        (reason, kind, decoded[f"{reason} {kind}"])
        for reason in FILTERED_REASONS
        for kind in KINDS
        if decoded[f"{reason} {kind}"] != "0"
    ]
    expected = [(r["reason"], r["kind"], r["events"]) for r in want]
    if got != expected:
        return f"totals by reason and kind {got}, raw events say {expected}"
    errors = ch.rows(
        f"SELECT error_code, count() AS errors FROM events WHERE ad_id = toUUID({ad}) AND kind = 'error' "
        f"AND traffic = 'valid' AND event_time >= toDateTime({from_ts}) AND event_time < toDateTime({to_ts}) "
        "GROUP BY error_code ORDER BY error_code"
    )
    if len(errors) < 2:
        return f"the sample window holds errors of {len(errors)} code(s); the check would prove little"
    expected = " ".join(f"{r['error_code']}:{r['errors']}" for r in errors)
    if decoded["error_codes"] != expected:
        return f"totals' errors by code {decoded['error_codes']!r}, raw events say {expected!r}"
    return None


EXPECTATIONS = {
    "ad_series.sql": expect_ad_series,
    "ads_active.sql": expect_ads_active,
    "ad_by_id.sql": expect_ad_by_id,
    "ads_count.sql": expect_ads_count,
    "first_event_day.sql": expect_first_event_day,
    "events_columns.sql": expect_events_columns,
}


def check_query(ch: Engine, path: Path) -> str | None:
    rows = ch.rows(prepare_query(path))
    expect = EXPECTATIONS.get(path.name)
    return expect(ch, rows) if expect else None


# --- window queries --------------------------------------------------------------------------


# Windows longer than this read whole days (src/domain/window.rs, WHOLE_DAYS_BEYOND).
WHOLE_DAYS_BEYOND = 31 * 86400


def window_params(from_ts: int, to_ts: int, whole_days: bool | None = None) -> dict[str, int]:
    """The parameters of a window [from, to) as the service computes them (src/domain/window.rs,
    Window::cuts): h_from/d_from = from rounded up to the hour/UTC day, h_to/d_to = to rounded
    down. A window without a whole hour (day) gets h_from >= h_to (d_from >= d_to): equal when it
    starts or ends on the hour (day), greater otherwise; h_from and d_from are never past `to`. Windows of up to 31 days read no days: the
    service passes d_from = d_to = h_from. `whole_days` forces either way (the SQL must be right
    in both)."""
    if from_ts % 60 or to_ts % 60:
        raise ValueError(f"window bounds must be whole minutes: {from_ts}, {to_ts}")
    if from_ts > to_ts:
        raise ValueError(f"from {from_ts} is after to {to_ts}")
    # Rounded up no further than `to`, as the service does (no DateTime past 2106 to wrap).
    h_from, h_to = min(-(-from_ts // 3600) * 3600, to_ts), to_ts // 3600 * 3600
    if whole_days is None:
        whole_days = to_ts - from_ts > WHOLE_DAYS_BEYOND
    d_from, d_to = (min(-(-from_ts // 86400) * 86400, to_ts), to_ts // 86400 * 86400) if whole_days else (h_from, h_from)
    return {"from": from_ts, "to": to_ts, "h_from": h_from, "h_to": h_to, "d_from": d_from, "d_to": d_to}


PARAM_NAMES = {"ad", "from", "to", "h_from", "h_to", "d_from", "d_to", "offset", "limit"}


def documented_params(path: Path) -> list[str]:
    """The parameter order a window query's header documents, e.g. the header sentence
    `Parameters (times as unix seconds): ad id, h_from, h_to, ….` -> ['ad', 'h_from', 'h_to', …]."""
    comments = " ".join(l.lstrip()[2:].strip() for l in path.read_text().splitlines() if l.lstrip().startswith("--"))
    m = re.search(r"Parameters\s*(?:\([^)]*\))?:\s*(.+?)\.(?:\s|$)", comments)
    if not m:
        raise ValueError("the header has no `Parameters (…): a, b, ….` sentence to bind by")
    names = []
    for part in m.group(1).split(","):
        part = re.sub(r"^(then\s+)?(the\s+)?(paging\s+)?", "", part.strip())
        for name in re.split(r"\s+and\s+", part):
            names.append("ad" if name.strip() == "ad id" else name.strip())
    unknown = [n for n in names if n not in PARAM_NAMES]
    if unknown:
        raise ValueError(f"cannot read parameter(s) {unknown} of the header's list {names}")
    return names


def params_for(order: list[str], window: dict[str, int], ad: str | None = None, page=(0, 1000)) -> list[str]:
    values = {**{k: str(v) for k, v in window.items()}, "offset": str(page[0]), "limit": str(page[1])}
    if ad is not None:
        values["ad"] = f"'{ad}'"
    return [values[n] for n in order]


def check_sample_params(path: Path) -> str | None:
    """The file's sample-params are window_params() of the sample window, in the documented order."""
    order = documented_params(path)
    _, sample = read_query(path)
    if len(sample) != len(order):
        return f"the header documents {len(order)} parameters {order}, sample-params has {len(sample)}"
    named = list(zip(order, sample))
    from_ts = int(next(v for n, v in named if n == "from"))
    to_ts = int(next(v for n, v in named if n == "to"))
    want = window_params(from_ts, to_ts)
    bad = [f"{n}={v} (window_params: {want[n]})" for n, v in named if n in want and int(v) != want[n]]
    ads = {v for n, v in named if n == "ad"}
    if len(ads) > 1:
        bad.append(f"different ad ids {sorted(ads)}")
    return f"sample window {fmt_ts(from_ts)} to {fmt_ts(to_ts)}: " + ", ".join(bad) if bad else None


# Hand-picked windows [from, to) on whole minutes (UTC).
EDGE_WINDOWS = [
    ("inside one hour", "2024-03-31 22:10", "2024-03-31 22:50"),
    ("one minute", "2024-04-01 00:00", "2024-04-01 00:01"),
    ("the minute before midnight", "2024-03-31 23:59", "2024-04-01 00:00"),
    ("exactly one whole hour", "2024-03-31 22:00", "2024-03-31 23:00"),
    ("one hour, off the hour", "2024-03-31 22:30", "2024-03-31 23:30"),
    ("crossing midnight and the month boundary", "2024-03-31 23:17", "2024-04-01 00:43"),
    ("the sample window", "2024-03-31 21:17", "2024-04-01 02:43"),
    ("starting exactly on an hour", "2024-04-01 01:00", "2024-04-01 03:37"),
    ("ending exactly on an hour", "2024-03-31 20:13", "2024-03-31 22:00"),
    ("starting exactly on a day", "2024-04-01 00:00", "2024-04-01 05:30"),
    ("ending exactly on a day", "2024-03-31 18:45", "2024-04-01 00:00"),
    ("exactly one whole day", "2024-03-31 00:00", "2024-04-01 00:00"),
    ("a day less one minute", "2024-03-31 00:00", "2024-03-31 23:59"),
    ("a day and two minutes around it", "2024-03-30 23:59", "2024-04-01 00:01"),
    ("whole days with hours and minutes at both ends", "2024-03-28 21:17", "2024-04-02 02:43"),
    ("whole days from and to midnight", "2024-03-27 00:00", "2024-04-04 00:00"),
    ("everything, with empty days around", "2024-03-20 00:00", "2024-04-10 00:00"),
    ("before the first event", "2024-03-10 00:00", "2024-03-12 00:00"),
]


def random_windows(n: int = 48) -> list[tuple[str, int, int]]:
    """Deterministic-random windows around the sample data: a third under an hour, a third up to
    two days, a third up to nine days; some start or end exactly on an hour or a day."""
    rng = random.Random(20240402)
    lo, hi = ts("2024-03-26 22:00"), ts("2024-04-04 02:00")
    out = []
    for i in range(n):
        minutes = [rng.randrange(1, 60), rng.randrange(60, 48 * 60), rng.randrange(24 * 60, 9 * 24 * 60)][i % 3]
        from_ts = lo + rng.randrange((hi - lo) // 60) * 60
        snap = rng.random()
        if snap < 0.2:
            from_ts -= from_ts % 3600
        elif snap < 0.3:
            from_ts -= from_ts % 86400
        to_ts = from_ts + minutes * 60
        snap = rng.random()
        if snap < 0.2 and to_ts % 3600:
            to_ts += 3600 - to_ts % 3600
        elif snap < 0.3 and to_ts % 86400:
            to_ts += 86400 - to_ts % 86400
        out.append((f"random #{i + 1}", from_ts, to_ts))
    return out


WINDOW_ADS = [AD1, AD2, AD3, AD4, AD5, UNKNOWN_AD]


class Recount:
    """Raw-event recounts of one window [from, to): per ad, and per ad and hour, every number of
    COUNTED (RECOUNT over the valid events, FILTERED_COLUMNS over the filtered ones). An hour (ad)
    with only filtered events is present, with zeros for RECOUNT."""

    def __init__(self, ch: Engine, from_ts: int, to_ts: int) -> None:
        where = f"event_time >= toDateTime({from_ts}) AND event_time < toDateTime({to_ts})"
        self.totals = {ad: r for (ad,), r in recount_all_traffic(ch, [("ad_id", "ad_id")], where).items()}
        self.hours: dict[str, dict[str, dict]] = {}
        hours = recount_all_traffic(ch, [("ad_id", "ad_id"), ("hour", "toStartOfHour(event_time)")], where)
        for (ad, hour), r in sorted(hours.items()):
            self.hours.setdefault(ad, {})[hour] = r


# ad_series.sql's columns: the hour, ad_counts' counts array (decode_counts), unique clicks, the
# sum of click playback positions and the errors by code.
SERIES_COLUMNS = ["hour", "counts", "unique_clicks", "click_playback_sum", "error_codes"]


def check_ad_series(ch: Engine, sql: str, order: list[str], w: dict, rc: Recount, ads) -> list[str]:
    """Every hour row and the totals row, decoded: every valid count, unique clicks, the playback
    sum and count, every filtered reason and kind, and the errors by code, against the recount."""
    problems = []
    for ad in ads:
        rows, totals = ch.rows_and_totals(bind(sql, params_for(order, w, ad)), SERIES_COLUMNS)
        hours = [r.get("hour") for r in rows]
        if hours != sorted(set(hours)):
            problems.append(f"{ad}: hours not strictly ascending: {hours[:4]}")
        want = rc.hours.get(ad, {})
        if set(hours) != set(want):
            problems.append(
                f"{ad}: hours only in the query {sorted(set(hours) - set(want))[:3]}, "
                f"only in the recount {sorted(set(want) - set(hours))[:3]}"
            )
        for r in rows:
            if r.get("hour") in want:
                got, label = decode_counts(r), f"{ad} {r['hour']} "
                problems += column_diffs(got, want[r["hour"]], COUNTED, label) + error_code_diffs(got, want[r["hour"]], label)
        got, label = decode_counts(totals), f"{ad} totals "
        problems += column_diffs(got, rc.totals.get(ad, ZERO), COUNTED, label)
        problems += error_code_diffs(got, rc.totals.get(ad, ZERO), label)
    return problems


def expected_ads_totals(rc: Recount) -> list[dict[str, str]]:
    rows = []
    for ad in CATALOG:
        counts = rc.totals.get(ad, ZERO)
        _, name, active, *_ = newest(ad)
        rows.append(
            {"ad_id": ad, "name": name, "active": str(active)}
            | {c: counts[c] for c in ("impressions", "clicks", "unique_clicks")}
        )
    return sorted(rows, key=lambda r: (-int(r["clicks"]), -int(r["impressions"]), r["ad_id"]))


def check_ads_totals(ch: Engine, sql: str, order: list[str], w: dict, rc: Recount, pages) -> list[str]:
    want = expected_ads_totals(rc)
    got = ch.rows(bind(sql, params_for(order, w, page=(0, 1000))))
    if [r.get("ad_id") for r in got] != [r["ad_id"] for r in want]:
        return [
            f"ads/order {[(r.get('ad_id', '?')[:2], r.get('clicks'), r.get('impressions')) for r in got]}, "
            f"expected {[(r['ad_id'][:2], r['clicks'], r['impressions']) for r in want]} "
            "(every catalog ad, clicks desc, impressions desc, id)"
        ]
    problems = []
    for g, e in zip(got, want):
        for c in ("name", "active"):
            if g.get(c) != e[c]:
                problems.append(f"{e['ad_id']} {c}: {g.get(c)!r} != {e[c]!r}")
        problems += column_diffs(g, e, ["impressions", "clicks", "unique_clicks"], f"{e['ad_id']} ")
    for offset, limit in pages:
        page = ch.rows(bind(sql, params_for(order, w, page=(offset, limit))))
        if page != got[offset : offset + limit]:
            problems.append(
                f"page offset {offset} limit {limit} gave {[r.get('ad_id', '?')[:2] for r in page]}, "
                f"expected {[r['ad_id'][:2] for r in got[offset : offset + limit]]}"
            )
    return problems


WINDOW_QUERIES = ["ad_series.sql", "ads_totals.sql"]


def summary(problems: list[str]) -> str | None:
    return f"{len(problems)} problem(s): " + "; ".join(problems[:3]) if problems else None


def run_window_checks(checks: Checks, ch: Engine) -> None:
    """Each window query over EDGE_WINDOWS (a check per query and window) and random_windows()
    (a check per query), against Recount."""
    loaded = {}
    for name in WINDOW_QUERIES:
        path = QUERIES_DIR / name

        def load(path=path) -> str | None:
            sql, _ = read_query(path)
            loaded[path.name] = (sql, documented_params(path))
            return check_sample_params(path)

        checks.run(f"query {name}: sample-params are window_params() in the header's order", load)
    rng = random.Random(20240403)
    hand = [(label, ts(a), ts(b), True) for label, a, b in EDGE_WINDOWS]
    windows = hand + [(label, f, t, False) for label, f, t in random_windows()]
    # Pages of the 5-ad catalog: single ads, slices, an empty page, pages reaching past the end.
    all_pages = [(0, 1), (1, 1), (1, 2), (2, 3), (4, 1), (3, 5), (0, 0), (7, 3)]
    random_failures: dict[str, list[str]] = {name: [] for name in loaded}
    for i, (label, from_ts, to_ts, named) in enumerate(windows):
        # The listing is checked with and without whole days (the service uses days only for
        # windows over 31 days, but the SQL must be exact either way).
        w_service, w_days = window_params(from_ts, to_ts), window_params(from_ts, to_ts, whole_days=True)
        rc = Recount(ch, from_ts, to_ts)
        where = f"{fmt_ts(from_ts)} to {fmt_ts(to_ts)}"
        # Every ad (with events, without any, unknown to the catalog) in the hand-picked windows;
        # the busiest ad and one other in the random ones, to keep the run short.
        ads = WINDOW_ADS if named else [AD1, rng.choice(WINDOW_ADS[1:])]
        pages = [all_pages[(3 * i + k) % len(all_pages)] for k in range(3 if named else 1)]
        for name, (sql, order) in loaded.items():

            def run(name=name, sql=sql, order=order) -> list[str]:
                if name == "ads_totals.sql":
                    return [p for w in (w_service, w_days) for p in check_ads_totals(ch, sql, order, w, rc, pages)]
                return check_ad_series(ch, sql, order, w_service, rc, ads)

            if named:
                checks.run(f"query {name} over {where} ({label}) equals a recount", lambda: summary(run()))
                continue
            try:
                problem = summary(run())
            except Exception as e:
                problem = f"{type(e).__name__}: {e}"
            if problem:
                random_failures[name].append(f"[{where}] {problem}")
    n = len(windows) - len(hand)
    for name, failures in random_failures.items():
        checks.run(
            f"query {name} over {n} random windows equals a recount",
            lambda f=failures: f"wrong in {len(f)} window(s), e.g. " + " | ".join(f[:2]) if f else None,
        )


# --- docs/analysts.md ------------------------------------------------------------------------


def doc_blocks(text: str) -> list[tuple[str, str, str]]:
    """(nearest heading, fence info, SQL) of every fenced block whose info starts with `sql`."""
    blocks, heading, fence, buf = [], "(no heading)", None, []
    for line in text.splitlines():
        if fence is not None:
            if line.strip() == "```":
                if fence.split()[:1] == ["sql"]:
                    blocks.append((heading, fence, "\n".join(buf)))
                fence, buf = None, []
            else:
                buf.append(line)
        elif line.startswith("```"):
            fence = line[3:].strip()
        elif re.match(r"#{1,6} ", line):
            heading = line.lstrip("#").strip()
    if fence is not None:
        raise ValueError(f"unclosed ``` block under {heading!r}")
    return blocks


RAW_TWIN = re.compile(r"--\s*The same (rows|answer|numbers) from raw events", re.I)


def doc_sql(sql: str) -> str:
    body = sql.strip().rstrip(";").strip()
    if ";" in "\n".join(l for l in body.splitlines() if not l.lstrip().startswith("--")):
        raise ValueError("more than one statement in one block")
    if "?" in body:
        raise ValueError("a `?` left in an example: examples must run as they are")
    return body


def results_differ(a: list[dict], b: list[dict]) -> str | None:
    if len(a) != len(b):
        return f"{len(a)} rows against {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if list(x) != list(y):
            return f"columns {list(x)} against {list(y)}"
        for c in x:
            if numbers_differ(x[c], y[c], 1e-6):
                return f"row {i + 1} {c}: {x[c]} against {y[c]}"
    return None


def run_doc_checks(checks: Checks, ch: Engine, make_db) -> None:
    if not ANALYSTS_DOC.exists():
        checks.fail("docs/analysts.md", f"{ANALYSTS_DOC} is missing")
        return
    blocks = doc_blocks(ANALYSTS_DOC.read_text())
    queries = [b for b in blocks if b[1] == "sql"]
    backfills = [b for b in blocks if b[1] == "sql backfill"]
    retention = [b for b in blocks if b[1] == "sql retention"]
    odd = [b[1] for b in blocks if b not in queries + backfills + retention]
    if odd or not queries:
        checks.fail("docs/analysts.md blocks", f"unknown ```{odd} blocks" if odd else "no ```sql blocks")
    seen: dict[str, int] = {}
    previous: dict[str, list[dict]] = {}
    for heading, _, sql in queries:
        seen[heading] = seen.get(heading, 0) + 1
        name = f"docs/analysts.md: {heading}" + (f" (block {seen[heading]})" if seen[heading] > 1 else "")

        def run(heading=heading, sql=sql) -> str | None:
            rows = ch.rows(doc_sql(sql))
            before, previous[heading] = previous.get(heading), rows
            if not rows:
                return "returned no rows on the sample data"
            if RAW_TWIN.match(sql.strip()):
                if before is None:
                    return "a raw-events twin needs a query before it under the same heading"
                diff = results_differ(before, rows)
                return f"the raw-events twin disagrees with the query above it: {diff}" if diff else None
            return None

        checks.run(name, run)
    if not (backfills or retention):
        return
    make_db(DB + "_backfill")
    try:
        if backfills:
            heading = backfills[0][0]
            checks.run(f"docs/analysts.md: {heading} ({len(backfills)} ```sql backfill blocks on a database "
                       "whose events predate the new tables, then new events): every table, ad_counts included, "
                       "equals a recount",
                       check_backfill, ch, [b[2] for b in backfills])  # fmt: skip
        else:
            setup_backfill(ch, set())
        if retention:
            checks.run(f"docs/analysts.md: {retention[0][0]} (```sql retention): one month of raw events gone, "
                       "aggregates unchanged", check_retention, ch, [b[2] for b in retention])  # fmt: skip
    finally:
        ch.use(DB)
        ch.execute(f"DROP DATABASE IF EXISTS {DB}_backfill")


def snapshot(ch: Engine, table: str, bucket: str) -> list[dict]:
    columns = [c for c in ch.rows(f"DESCRIBE TABLE {table}") if c["name"] not in ("ad_id", bucket)]
    merged = ", ".join(f"{merge_function(c['type'])}({c['name']}) AS {c['name']}" for c in columns)
    return ch.rows(f"SELECT ad_id, {bucket}, {merged} FROM {table} GROUP BY ad_id, {bucket} ORDER BY ad_id, {bucket}")


def setup_backfill(ch: Engine, targets: set[str], before=None) -> str | None:
    """The schema without the tables in `targets`, the sample events, then the rest of the schema:
    the tables in `targets` (and their views) are created after the events were stored. `before`,
    if given, runs between the events and the rest of the schema; a string it returns is a failure."""
    files = [p for _, p in migration_files()]
    first = next(
        (i for i, p in enumerate(files) if any(re.search(rf"CREATE TABLE IF NOT EXISTS {t}\b", p.read_text()) for t in targets)),
        None,
    )
    # An upgrade applies the migration that creates a target and every one after it, in order.
    later = files[first:] if first is not None else []
    if targets and not later:
        return f"no migration creates {sorted(targets)}"
    for _, p in migration_files():
        if p not in later and (problem := apply_migration(ch, p)):
            return f"{p.name}: {problem}"
    for rows in all_sample_events()[:2]:
        insert_events(ch, rows)
    if before and (problem := before()):
        return problem
    for p in later:
        if problem := apply_migration(ch, p):
            return f"{p.name}: {problem}"
    return None


# A ```sql backfill block that empties ad_counts, so that its migration's copies run again.
TRUNCATE_AD_COUNTS = re.compile(r"TRUNCATE\s+TABLE\s+ad_counts", re.I)


def ad_counts_copies() -> list[str]:
    """The `INSERT INTO ad_counts` statements of the migration creating ad_counts (split like every
    migration), in file order: the copies docs/analysts.md has the reader run after emptying it."""
    migration = ad_counts_migration()
    found = [st for st in statements(migration.read_text()) if re.match(r"INSERT\s+INTO\s+ad_counts\b", st, re.I)]
    if len(found) != len(AD_COUNTS_GRAINS):
        raise AssertionError(
            f"expected one INSERT INTO ad_counts per grain ({len(AD_COUNTS_GRAINS)}) in {migration.name}, "
            f"found {len(found)}"
        )
    return found


def check_backfill(ch: Engine, backfills: list[str]) -> str | None:
    """The doc's backfill blocks, in document order, on a database whose newer aggregate tables
    (those the blocks fill and every one a later migration creates, ad_counts included) were
    created after its events were stored; then more events arrive through the views. Every
    aggregate table must then equal a recount of `events`, ad_counts in both grains. A block
    `TRUNCATE TABLE ad_counts` is followed, as the doc tells the reader, by the `INSERT INTO
    ad_counts` statements of ad_counts' migration."""
    targets, truncated = set(), set()
    for sql in backfills:
        body = doc_sql(sql)
        if re.fullmatch(TRUNCATE_AD_COUNTS, body):
            truncated.add("ad_counts")
            continue
        m = re.match(r"(?:INSERT\s+INTO|ALTER\s+TABLE)\s+(ad_stats_\w+|ad_errors_minutely)\b", body, re.I)
        if not m:
            return (
                "a ```sql backfill block is neither INSERT INTO nor ALTER TABLE an ad_stats_* table or "
                "ad_errors_minutely "
                f"nor TRUNCATE TABLE ad_counts: {sql[:60]!r}"
            )
        targets.add(m.group(1))
    copies = ad_counts_copies() if truncated else []
    # ad_counts too is created after the events (its migration comes after the targets' own).
    if problem := setup_backfill(ch, targets | truncated):
        return problem
    for t in sorted(targets):
        if ch.scalar(f"SELECT count() FROM {t}") != "0":
            return f"{t} is not empty before the backfill, so the scenario tests nothing"
    for sql in backfills:
        body = doc_sql(sql)
        if re.fullmatch(TRUNCATE_AD_COUNTS, body):
            # ad_counts' migration copied the named tables while those created after the events
            # (ad_stats_minutely among them) were still empty, so its minute grain lacks the
            # events; were it already right, the re-copy would go untested.
            if check_ad_counts(ch, several_rows_per_key=False, filtered=False) is None:
                return "ad_counts equals a recount before TRUNCATE TABLE ad_counts already: the re-copy goes untested"
            ch.execute(body)
            for st in copies:
                ch.execute(st)
        else:
            ch.execute(body)
    for rows in all_sample_events()[2:]:  # events that arrive after the views exist
        insert_events(ch, rows, per_insert=len(rows))
    for table, bucket, expr in STATS_TABLES:
        if problem := check_stats(ch, table, bucket, expr, several_rows_per_key=False):
            return f"after the backfill: {problem}"
    # The events stored before migration 0007 are all valid: no filtered traffic to demand.
    if problem := check_ad_counts(ch, several_rows_per_key=False, filtered=False):
        return f"after the backfill: {problem}"
    return None


def check_retention(ch: Engine, retention: list[str]) -> str | None:
    before = {t: snapshot(ch, t, b) for t, b, _ in STATS_TABLES} | {"ad_counts": read_ad_counts(ch)}
    months = ch.scalar("SELECT uniqExact(toYYYYMM(event_time)) FROM events")
    for sql in retention:
        ch.execute(doc_sql(sql))
    left = ch.scalar("SELECT uniqExact(toYYYYMM(event_time)) FROM events")
    if left != str(int(months) - 1):
        return f"raw events span {left} month(s) after the retention block, {months} before: expected one fewer"
    changed = [t for t, b, _ in STATS_TABLES if snapshot(ch, t, b) != before[t]]
    if read_ad_counts(ch) != before["ad_counts"]:
        changed.append("ad_counts")
    return f"the retention block changed {changed}" if changed else None


def ad_counts_migration() -> Path:
    """The migration that creates ad_counts."""
    found = [p for _, p in migration_files() if re.search(r"CREATE TABLE IF NOT EXISTS ad_counts\b", p.read_text())]
    if len(found) != 1:
        raise AssertionError(f"expected one migration creating ad_counts, found {[p.name for p in found]}")
    return found[0]


# The aggregate tables ad_counts' migration copies from.
AD_COUNTS_SOURCES = ["ad_stats_hourly", "ad_stats_minutely", "ad_filtered_minutely", "ad_errors_minutely"]


def check_ad_counts_backfill(ch: Engine) -> str | None:
    """The migration creating ad_counts, applied to a database whose AD_COUNTS_SOURCES already
    hold the sample events (valid and filtered) while ad_counts does not exist: its INSERTs fill both grains with exactly a recount
    of `events`; the migration applied again changes nothing (each copy runs only while its grain
    is empty); events that arrive afterwards are counted once, through the views."""
    migration = ad_counts_migration()

    def before() -> str | None:
        tables = {r["name"] for r in ch.rows("SELECT name FROM system.tables WHERE database = currentDatabase()")}
        if "ad_counts" in tables:
            return "ad_counts exists before its migration runs, so the scenario tests nothing"
        for table in AD_COUNTS_SOURCES:
            if table not in tables or ch.scalar(f"SELECT count() FROM {table}") == "0":
                return f"{table} holds nothing before {migration.name}, so the copy from it goes untested"
        return None

    if problem := setup_backfill(ch, {"ad_counts"}, before):
        return problem
    grains = {r["grain"]: r["n"] for r in ch.rows("SELECT grain, count() AS n FROM ad_counts GROUP BY grain")}
    if set(grains) != {g for g, _ in AD_COUNTS_GRAINS}:
        return f"after {migration.name} ad_counts holds rows of grains {grains}, expected both"
    if problem := check_ad_counts(ch, several_rows_per_key=False):
        return f"after {migration.name}: {problem}"
    stored, state = ch.scalar("SELECT count() FROM ad_counts"), read_ad_counts(ch)
    if problem := apply_migration(ch, migration):
        return f"{migration.name} applied again: {problem}"
    again = ch.scalar("SELECT count() FROM ad_counts")
    if again != stored or read_ad_counts(ch) != state:
        return f"{migration.name} applied again changed ad_counts ({stored} rows before, {again} after): copied twice"
    for rows in all_sample_events()[2:]:  # events that arrive after the views exist
        insert_events(ch, rows, per_insert=len(rows))
    if problem := check_ad_counts(ch, several_rows_per_key=False):
        return f"after new events: {problem}"
    return None


def run_ad_counts_backfill(checks: Checks, ch: Engine, make_db) -> None:
    make_db(DB + "_counts")
    try:
        checks.run(
            f"ad_counts: its migration's INSERTs copy {', '.join(AD_COUNTS_SOURCES)} "
            "(both grains equal a recount), a second run changes nothing, new events count once",
            check_ad_counts_backfill, ch,
        )  # fmt: skip
    finally:
        ch.use(DB)
        ch.execute(f"DROP DATABASE IF EXISTS {DB}_counts")


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="adbeacon-chdb-") as tmp:
        ch = Engine(tmp) if SERVER is None else HttpEngine(SERVER)
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
    print(f"# {ch.describe()}, checking {ROOT}")

    def make_db(name: str) -> str:
        ch.execute(f"DROP DATABASE IF EXISTS {name}")
        ch.execute(f"CREATE DATABASE {name}")
        ch.use(name)
        return name

    def use_db() -> str | None:
        make_db(DB)
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
    checks.run("every ad_stats_* table is in STATS_TABLES", check_stats_tables_listed, ch, DB)

    first_day = QUERIES_DIR / "first_event_day.sql"
    if first_day.exists():
        checks.run(
            "query first_event_day.sql on an empty database is 0",
            lambda: (lambda r: None if r == "0" else f"got {r}")(ch.scalar(prepare_query(first_day))),
        )

    stop_merges(ch, DB)
    if not checks.run("sample data", insert_sample_data, ch):
        return
    for table, bucket, expr in STATS_TABLES:
        checks.run(
            f"{table} matches a recount of events (unmerged parts)",
            check_stats, ch, table, bucket, expr, True,
        )  # fmt: skip

    checks.run("ad_counts matches a recount of events, both grains (unmerged parts)", check_ad_counts, ch, True)

    # The window queries run on the unmerged parts: their GROUP BY must merge several states per key.
    run_window_checks(checks, ch)

    for table, bucket, expr in STATS_TABLES:

        def merge_stats(table=table, bucket=bucket, expr=expr) -> str | None:
            ch.execute(f"SYSTEM START MERGES {table}")
            ch.execute(f"OPTIMIZE TABLE {table} FINAL")
            return check_stats(ch, table, bucket, expr, False)

        checks.run(f"{table} matches a recount of events (after OPTIMIZE FINAL)", merge_stats)

    def merge_counts() -> str | None:
        ch.execute("SYSTEM START MERGES ad_counts")
        ch.execute("OPTIMIZE TABLE ad_counts FINAL")
        return check_ad_counts(ch, False)

    checks.run("ad_counts matches a recount of events, both grains (after OPTIMIZE FINAL)", merge_counts)

    queries = sorted(QUERIES_DIR.glob("*.sql"))
    if not queries:
        checks.fail("queries discovered", f"no queries in {QUERIES_DIR}")
    for name in sorted(set(EXPECTATIONS) - {q.name for q in queries}):
        print(f"# note: {name} is gone; its result check is unused")
    for q in queries:
        checks.run(f"query {q.name}", check_query, ch, q)

    run_dashboard_checks(checks, ch)
    run_doc_checks(checks, ch, make_db)
    run_ad_counts_backfill(checks, ch, make_db)
    if SERVER is None:  # the current engine only: 18.16 has no such settings
        run_dedup_checks(checks, ch, make_db)


# --- server-side insert deduplication (ClickHouse 22.8 and later) ----------------------------

DEDUP_SQL = ROOT / "clickhouse" / "dedup" / "enable.sql"
# What src/store/clickhouse.rs (insert_events) adds to every INSERT on such servers.
DEDUP_SETTINGS = "insert_deduplicate = 1, deduplicate_blocks_in_dependent_materialized_views = 1"


def run_dedup_checks(checks: Checks, ch: Engine, make_db) -> None:
    """clickhouse/dedup/enable.sql on the migrated schema: an INSERT repeated with its token is
    stored once in events and in every view's table; different INSERTs whose view rows happen to
    be identical both count; the aggregates still equal a recount of events."""
    cols = "event_id, ad_id, kind, event_time, received_at, ip_hash, playback_time, error_code, batch_id, traffic"

    def insert(rows: list[str], token: str) -> None:
        ch.execute(
            f"INSERT INTO events ({cols}) SETTINGS {DEDUP_SETTINGS}, insert_deduplication_token = '{token}' "
            "VALUES " + ", ".join(rows)
        )

    def setup() -> str | None:
        make_db(DB + "_dedup")
        for _, path in migration_files():
            problem = apply_migration(ch, path)
            if problem:
                return f"{path.name}: {problem}"
        for st in statements(DEDUP_SQL.read_text()):
            ch.execute(st)
        return None

    if not checks.run("dedup: enable.sql applies to the migrated schema", setup):
        return
    rows = sample_events()
    chunks = [rows[i : i + 60] for i in range(0, len(rows), 60)]

    def repeated() -> str | None:
        for i, chunk in enumerate(chunks):
            insert(chunk, f"chunk-{i}")
        insert(chunks[2], "chunk-2")  # a retry whose first attempt landed
        n = int(ch.scalar("SELECT count() FROM events"))
        return None if n == len(rows) else f"events holds {n} rows, want {len(rows)}: the repeat was stored"

    def identical_view_rows() -> str | None:
        t = datetime(2024, 3, 31, 22, 0, 0, tzinfo=UTC)
        for token in ("single-1", "single-2"):
            insert([event_tuple(uuid.uuid4(), AD1, "click", t, t, 7, 1.0, 0, uuid.uuid4())], token)
        n = int(ch.scalar("SELECT count() FROM events"))
        return None if n == len(rows) + 2 else f"events holds {n} rows, want {len(rows) + 2}"

    checks.run("dedup: an INSERT repeated with its token is stored once", repeated)
    checks.run("dedup: two INSERTs with identical view rows both count", identical_view_rows)
    for table, bucket, expr in STATS_TABLES:
        checks.run(f"dedup: {table} matches a recount of events", check_stats, ch, table, bucket, expr, False)
    checks.run("dedup: ad_counts matches a recount of events", check_ad_counts, ch, False)


# --- Grafana dashboards ----------------------------------------------------------------------

DASHBOARDS_DIR = ROOT / "deploy" / "grafana" / "dashboards"


def dashboard_sql() -> list[tuple[str, str]]:
    """(panel, rawSql) of every ClickHouse query in the dashboards."""
    found = []
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        for top in json.loads(path.read_text()).get("panels", []):
            for panel in [top, *top.get("panels", [])]:
                for target in panel.get("targets") or []:
                    if target.get("rawSql"):
                        found.append((f"{path.name}: {panel.get('title')}", target["rawSql"]))
    return found


def expand_grafana(sql: str, from_ts: int, to_ts: int, variables: dict[str, str]) -> str:
    """The SQL as the ClickHouse plugin sends it: $__timeFilter(col) becomes a closed range."""
    sql = re.sub(
        r"\$__timeFilter\((\w+)\)",
        lambda m: f"{m.group(1)} >= toDateTime({from_ts}) AND {m.group(1)} <= toDateTime({to_ts})",
        sql,
    )
    for name, value in variables.items():
        sql = sql.replace("${" + name + "}", value).replace("$" + name, value)
    left = re.findall(r"\$\{?\w+", sql)
    if left:
        raise AssertionError(f"macros this check does not expand: {left}")
    return sql


def check_top_ads_by_ctr(ch: Engine, rows: list[dict[str, str]]) -> str | None:
    want = {
        r["ad_id"]: r
        for r in ch.rows(
            "SELECT toString(ad_id) AS ad_id, countIf(kind = 'impression') AS impressions, "
            "countIf(kind = 'click') AS clicks FROM events WHERE traffic = 'valid' "
            "GROUP BY ad_id HAVING impressions >= 1"
        )
    }
    if not rows:
        return "no rows"
    problems = []
    for r in rows:
        w = want.get(r["ad_id"])
        if w is None:
            problems.append(f"{r['ad_id']} has no valid impressions in events")
            continue
        ctr = round(100 * int(w["clicks"]) / int(w["impressions"]), 2)
        name = newest(r["ad_id"])[1] if r["ad_id"] in CATALOG else r["ad_id"]
        if (r["impressions"], r["clicks"]) != (w["impressions"], w["clicks"]):
            problems.append(f"{r['ad_id']}: {r['impressions']}/{r['clicks']}, recount {w['impressions']}/{w['clicks']}")
        if numbers_differ(r["ctr_percent"], str(ctr)):
            problems.append(f"{r['ad_id']}: CTR {r['ctr_percent']}, recount {ctr}")
        if r["ad"] != name:
            problems.append(f"{r['ad_id']}: named {r['ad']!r}, want {name!r}")
    if len(rows) != min(20, len(want)):
        problems.append(f"{len(rows)} rows, want {min(20, len(want))}")
    ctrs = [float(r["ctr_percent"]) for r in rows]
    if ctrs != sorted(ctrs, reverse=True):
        problems.append(f"not ordered by CTR: {ctrs}")
    return "; ".join(problems) or None


def run_dashboard_checks(checks: Checks, ch: Engine) -> None:
    panels = dashboard_sql()
    if not panels:
        checks.fail("dashboard SQL discovered", f"no rawSql in {DASHBOARDS_DIR}/*.json")
    # Every sample event, and the year 2100 as the end of the range.
    window = (0, 4102444800)
    for name, sql in panels:

        def run(sql=sql, name=name) -> str | None:
            rows = ch.rows(expand_grafana(sql, *window, {"min_impressions": "1"}))
            if name.endswith("Top ads by CTR"):
                return check_top_ads_by_ctr(ch, rows)
            return None if rows else "no rows on the sample data"

        checks.run(f"dashboard SQL {name}", run)


if __name__ == "__main__":
    sys.exit(main())
