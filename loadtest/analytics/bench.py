#!/usr/bin/env python3
"""Times GET /ads/analytics against the raw-table SQL that would give the same numbers.

Run by scripts/bench-analytics.sh (`make bench-analytics`) once the data is loaded; standard
library only. For each timeframe (1h, 24h, 7d, 30d, all):

- one ad (`--ad`, the hottest): `GET /ads/analytics?adId=…&timeframe=…` on one keep-alive
  connection, and for the window [from, to) of its first answer the two queries over `events`
  that its numbers would need without aggregates (the per-hour series, and in one pass every
  total it answers with: each kind's count, unique clicks, the playback position of clicks, VAST
  errors by code and the filtered traffic by reason), sent concurrently to ClickHouse's HTTP
  interface (the endpoint sends one query, which reads all of it from `ad_counts`), a request
  counting as done when both answered; after a warm-up the two sides take turns in runs of
  `--block` requests, so that both see the same machine (it is shared, and its speed drifts
  within a run) without each endpoint request following a raw query: a raw query reads a
  hundred megabytes or more and leaves ClickHouse's caches cold for whatever runs next, which
  cost the endpoint about 2 ms at p50 when the sides took turns request by request (`--block 1`,
  the method before 2026-11-23's evening);
- every ad: `GET /ads/analytics?timeframe=…` against one raw query (per ad impressions, clicks and
  unique clicks over the window, busiest first, top 100).

It prints p50/p99 of each side and their ratios, whether the targets are met (p99 <= 50 ms for
every timeframe; for 30d, the endpoint >= 20x faster than the raw SQL), and checks the endpoint's
counts against the raw table for the same window (impressions, clicks, the series, hourlyClicks,
every kind in `video`, the average playback position, the error codes, the filtered traffic and the
listing must be equal; uniqueClicks is an estimate and may differ a little, so only its
difference is shown). Writes the report as markdown to --out.

Exit status: 0 when the numbers agree (targets met or not), 1 when the endpoint answered an error
or a number that differs from the raw table, 2 when the endpoint does not exist (404: the raw
side is still measured, over windows computed here, so it can be developed against).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import datetime as dt
import http.client
import json
import math
import sys
import threading
import time
import urllib.parse

TIMEFRAMES = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400, "all": None}
P99_TARGET_MS = 50.0
RATIO_TARGET = 20.0
RATIO_TIMEFRAME = "30d"

# The raw-table equivalents. {ad}, {lo}, {hi}: ad id and window bounds as unix seconds. Counts,
# unique clicks and the series count valid traffic only, as the aggregates do; the filtered events
# are counted per reason. The totals query reads the window once for every total the endpoint
# answers with (each kind, unique clicks, playback, errors by code, filtered traffic).
WINDOW = "event_time >= toDateTime({lo}) AND event_time < toDateTime({hi})"
VALID = "traffic = 'valid'"
KINDS = {  # events.kind -> the endpoint's key in `video` (impressions and clicks are top-level)
    "impression": None, "click": None, "creative_view": "creativeViews", "start": "starts",
    "first_quartile": "firstQuartile", "midpoint": "midpoint", "third_quartile": "thirdQuartile",
    "complete": "completes", "skip": "skips", "pause": "pauses", "resume": "resumes", "mute": "mutes",
    "unmute": "unmutes", "close": "closes", "error": "errors",
}
REASONS = {"duplicate": 1, "bot": 2, "empty_user_agent": 3}  # events.traffic's Enum8 values
AD_COLUMNS = ", ".join(
    [f"countIf(kind = '{k}' AND {VALID}) AS {k}" for k in KINDS]
    + [f"uniqIf(ip_hash, kind = 'click' AND {VALID}) AS unique_clicks",
       f"sumIf(toFloat64(playback_time), kind = 'click' AND {VALID}) AS click_playback_sum",
       f"countIf(kind = 'click' AND isNotNull(playback_time) AND {VALID}) AS click_playback_count",
       f"sumMapIf([error_code], [toUInt64(1)], kind = 'error' AND {VALID}) AS error_codes",
       f"sumMapIf([toUInt8(traffic)], [toUInt64(1)], traffic != 'valid') AS filtered_events",
       "sumMapIf([toUInt8(traffic)], [toUInt64(1)], traffic != 'valid' AND kind = 'impression') AS filtered_impressions",
       "sumMapIf([toUInt8(traffic)], [toUInt64(1)], traffic != 'valid' AND kind = 'click') AS filtered_clicks"])
AD_FIELDS = list(KINDS) + [
    "unique_clicks", "click_playback_sum", "click_playback_count", "error_codes", "filtered_events",
    "filtered_impressions", "filtered_clicks",
]
# The series shows impressions, clicks and unique clicks per hour; the totals every count.
RAW_SERIES = (
    "SELECT toStartOfHour(event_time) AS hour, countIf(kind = 'impression') AS impressions, "
    "countIf(kind = 'click') AS clicks, uniqIf(ip_hash, kind = 'click') AS unique_clicks FROM events "
    f"WHERE ad_id = toUUID('{{ad}}') AND {WINDOW} AND {VALID} GROUP BY hour ORDER BY hour FORMAT TabSeparated"
)
RAW_TOTALS = (
    f"SELECT {AD_COLUMNS} FROM events WHERE ad_id = toUUID('{{ad}}') AND {WINDOW} FORMAT TabSeparated"
)
RAW_LISTING = (
    "SELECT ad_id, countIf(kind = 'impression') AS impressions, countIf(kind = 'click') AS clicks, "
    "uniqIf(ip_hash, kind = 'click') AS unique_clicks FROM events "
    f"WHERE {WINDOW} AND {VALID} GROUP BY ad_id ORDER BY clicks DESC LIMIT 100 FORMAT TabSeparated"
)
# Untimed: how many raw rows the ad's window holds (what the raw query has to read).
RAW_ROWS_AD = f"SELECT count() FROM events WHERE ad_id = toUUID('{{ad}}') AND {WINDOW} FORMAT TabSeparated"
RAW_ROWS_ALL = f"SELECT count() FROM events WHERE {WINDOW} FORMAT TabSeparated"
FIRST_EVENT = "SELECT toUInt32(toStartOfDay(min(event_time))) FROM events {where} FORMAT TabSeparated"


def sum_map(text: str) -> dict[int, int]:
    """A sumMap answer in TabSeparated, `([k1,k2],[v1,v2])`, as {k: v}."""
    keys, values = ast.literal_eval(text)
    return dict(zip(keys, values))


class Conn:
    """One keep-alive HTTP/1.1 connection; reconnects once if the server closed an idle one."""

    def __init__(self, base_url: str):
        u = urllib.parse.urlsplit(base_url)
        self.host, self.port = u.hostname, u.port or 80
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
            try:
                self.conn.request(method, path, body=body)
                resp = self.conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    http.client.CannotSendRequest, http.client.BadStatusLine):
                self.close()
                if attempt:
                    raise
                continue
            if resp.will_close:
                self.close()
            return resp.status, data
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class ClickHouse:
    """ClickHouse's HTTP interface; one keep-alive connection per calling thread."""

    def __init__(self, url: str, database: str):
        self.url = url
        self.path = "/?" + urllib.parse.urlencode({"database": database})
        self.local = threading.local()

    def query(self, sql: str) -> list[list[str]]:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = Conn(self.url)
        status, data = conn.request("POST", self.path, sql.encode())
        if status != 200:
            raise RuntimeError(f"ClickHouse answered {status}: {data.decode(errors='replace').strip()}")
        return [line.split("\t") for line in data.decode().splitlines()]


def percentile(samples: list[float], p: float) -> float:
    """Nearest rank: the smallest sample with at least p % of the samples at or below it."""
    s = sorted(samples)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def rfc3339_to_unix(value: str) -> int:
    t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp())


def iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.app = Conn(args.app)
        self.ch = ClickHouse(args.clickhouse, args.database)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self.errors: list[str] = []  # wrong numbers or error answers: exit 1
        self.endpoint_missing = False

    # ------------------------------------------------------------ the two sides
    def get(self, path: str) -> tuple[int, bytes]:
        return self.app.request("GET", path)

    def first_answer(self, path: str) -> dict | None:
        """The endpoint's answer, untimed (its window is the one the raw SQL then reads); None when
        it answered an error or does not exist."""
        status, body = self.get(path)
        # The router's own 404 ("no such endpoint"), not the endpoint's (e.g. an unknown ad).
        if status == 404 and (self.endpoint_missing or b"no such endpoint" in body or not body.startswith(b"{")):
            self.endpoint_missing = True
            return None
        if status != 200:
            self.errors.append(f"GET {path} answered {status}: {body[:300].decode(errors='replace')}")
            return None
        return json.loads(body)

    def raw_once(self, queries: list[str]) -> tuple[float, list[list[list[str]]]]:
        """The queries concurrently (one thread each); returns the time and the answers."""
        t0 = time.perf_counter()
        futures = [self.pool.submit(self.ch.query, q) for q in queries]
        answers = [f.result() for f in futures]
        return time.perf_counter() - t0, answers

    def time_both(self, path: str | None, queries: list[str]) -> tuple[list[float] | None, list[float], list]:
        """Warm-up, then the timed requests, the endpoint's and the raw SQL's taking turns in runs
        of --block requests, so that both sides see the same machine (it is shared, and its speed
        drifts within a run). Returns the endpoint's seconds per request (None without an
        endpoint), the raw SQL's, and the raw SQL's last answers."""
        answers: list = []
        ep: list[float] | None = [] if path is not None else None
        raw: list[float] = []
        total, block = self.args.warmup + self.args.requests, self.args.block
        for first in range(0, total, block):
            run = range(first, min(first + block, total))
            for i in run:
                if path is None:
                    break
                t0 = time.perf_counter()
                status, body = self.get(path)
                if i >= self.args.warmup:
                    ep.append(time.perf_counter() - t0)
                if status != 200:
                    self.errors.append(f"GET {path} answered {status}: {body[:300].decode(errors='replace')}")
                    path, ep = None, None
            for i in run:
                took, answers = self.raw_once(queries)
                if i >= self.args.warmup:
                    raw.append(took)
        return ep, raw, answers

    # ------------------------------------------------------------ windows
    def window(self, answer: dict | None, tf: str, ad: str | None) -> tuple[int, int]:
        """The endpoint's [from, to) when it answered, else the same rule computed here."""
        if answer is not None:
            lo, hi = rfc3339_to_unix(answer["from"]), rfc3339_to_unix(answer["to"])
            if lo % 60 or hi % 60:
                self.errors.append(f"timeframe={tf}: window {answer['from']} .. {answer['to']} is not on whole minutes")
            return lo, hi
        hi = int(time.time()) // 60 * 60
        if TIMEFRAMES[tf] is not None:
            return hi - TIMEFRAMES[tf], hi
        where = f"WHERE ad_id = toUUID('{ad}')" if ad else ""
        return int(self.ch.query(FIRST_EVENT.format(where=where))[0][0]), hi

    # ------------------------------------------------------------ one ad
    def run_ad(self) -> list[dict]:
        ad = self.args.ad
        rows = []
        for tf in TIMEFRAMES:
            path = f"/ads/analytics?adId={ad}&timeframe={tf}"
            answer = self.first_answer(path)
            lo, hi = self.window(answer, tf, ad)
            fmt = {"ad": ad, "lo": lo, "hi": hi}
            queries = [RAW_SERIES.format(**fmt), RAW_TOTALS.format(**fmt)]
            ep, raw, (series, totals) = self.time_both(path if answer is not None else None, queries)
            scanned = int(self.ch.query(RAW_ROWS_AD.format(**fmt))[0][0])
            row = {"tf": tf, "lo": lo, "hi": hi, "rows": scanned, "ep": ep, "raw": raw}
            if answer is not None:
                row["check"] = self.check_ad(tf, answer, series, totals[0] if totals else None)
            rows.append(row)
            log(row_line(row))
        return rows

    def check_ad(self, tf: str, answer: dict, series: list[list[str]], totals: list[str] | None) -> dict:
        """Compares one answer with the raw rows of the same window."""
        raw = dict(zip(AD_FIELDS, totals)) if totals else {}
        maps = {k: sum_map(v) for k, v in raw.items() if k.startswith(("error_codes", "filtered_"))}
        raw_int = {k: (float(v) if k == "click_playback_sum" else int(v)) for k, v in raw.items() if k not in maps}
        c: dict = {}

        def same(name: str, got, want) -> str:
            if got != want:
                self.errors.append(f"timeframe={tf}: {name} is {got}, the raw table says {want}")
                return f"{got} ≠ {want}"
            return f"{got}"

        c["impressions"] = same("impressions", answer.get("impressions"), raw_int.get("impression", 0))
        c["clicks"] = same("totalClicks", answer.get("totalClicks"), raw_int.get("click", 0))
        uq, raw_uq = answer.get("uniqueClicks"), raw_int.get("unique_clicks", 0)
        c["unique"] = f"{uq} / {raw_uq} ({'+' if isinstance(uq, int) and uq >= raw_uq else ''}"
        c["unique"] += f"{uq - raw_uq})" if isinstance(uq, int) else "?)"

        # The series: the raw hours summed into the endpoint's buckets (whatever their size).
        buckets = []
        for item in answer.get("series") or []:
            buckets.append([rfc3339_to_unix(item["start"]), item.get("impressions"), item.get("clicks"), 0, 0])
        buckets.sort(key=lambda b: b[0])
        bad_series = 0
        if not buckets:
            bad_series = -1
        else:
            starts = [b[0] for b in buckets]
            for r in series:
                hour = rfc3339_to_unix(r[0].replace(" ", "T") + "Z")
                if hour < starts[0]:  # before the first bucket: counted nowhere
                    bad_series += 1
                    continue
                i = _bucket(starts, hour)
                buckets[i][3] += int(r[1])
                buckets[i][4] += int(r[2])
            bad_series += sum(1 for b in buckets if b[1] != b[3] or b[2] != b[4])
        if bad_series:
            self.errors.append(f"timeframe={tf}: series differs from the raw table in {bad_series} buckets"
                               if bad_series > 0 else f"timeframe={tf}: series is empty")
        c["series"] = (f"{len(buckets)} ok" if bad_series == 0 else
                       "empty" if bad_series < 0 else f"{bad_series}/{len(buckets)} differ")

        # hourlyClicks: clicks per hour of the day (UTC) over the window.
        hc = answer.get("hourlyClicks")
        if isinstance(hc, dict):
            want = {f"{h:02d}": 0 for h in range(24)}
            for r in series:
                want[r[0][11:13]] += int(r[2])
            got = {k: hc.get(k, 0) for k in want}
            diff = [k for k in want if got[k] != want[k]]
            if diff:
                self.errors.append(f"timeframe={tf}: hourlyClicks differs for hours {','.join(diff)}: "
                                   f"{ {k: got[k] for k in diff} } vs raw { {k: want[k] for k in diff} }")
            c["hourly"] = "ok" if not diff else f"{len(diff)} hours differ"
        else:
            c["hourly"] = "absent"

        # Every other kind's count in `video`, and the average playback position of clicks.
        video = answer.get("video") if isinstance(answer.get("video"), dict) else {}
        wrong_before = len(self.errors)
        for kind, key in KINDS.items():
            if key is not None:
                same(f"video.{key}", video.get(key), raw_int.get(kind, 0))
        n = raw_int.get("click_playback_count", 0)
        want_avg = raw_int.get("click_playback_sum", 0.0) / n if n else None
        got_avg = video.get("avgClickPlaybackTime")
        if (got_avg is None) != (want_avg is None) or (
                want_avg is not None and not math.isclose(got_avg, want_avg, rel_tol=1e-9)):
            self.errors.append(f"timeframe={tf}: video.avgClickPlaybackTime is {got_avg}, the raw table says {want_avg}")
        counted = sum(1 for key in KINDS.values() if key is not None)
        c["video"] = f"{counted} counts and playback ok" if len(self.errors) == wrong_before else "differs"

        # VAST errors by code, and the traffic that does not count, by reason.
        wrong_before = len(self.errors)
        got_codes = {e.get("code"): e.get("count") for e in answer.get("errorCodes") or []}
        same("errorCodes", got_codes, maps.get("error_codes", {}))
        filtered = (answer.get("traffic") or {}).get("filtered") or {}
        for reason, value in REASONS.items():
            key = {"empty_user_agent": "emptyUserAgent"}.get(reason, reason)
            got = filtered.get(key) or {}
            for field in ("events", "impressions", "clicks"):
                same(f"traffic.filtered.{key}.{field}", got.get(field), maps.get(f"filtered_{field}", {}).get(value, 0))
        c["quality"] = (f"{len(got_codes)} codes, {sum(maps.get('filtered_events', {}).values())} filtered: ok"
                        if len(self.errors) == wrong_before else "differs")
        return c

    # ------------------------------------------------------------ every ad
    def run_listing(self) -> list[dict]:
        rows = []
        for tf in TIMEFRAMES:
            path = f"/ads/analytics?timeframe={tf}"
            answer = self.first_answer(path)
            lo, hi = self.window(answer, tf, None)
            fmt = {"lo": lo, "hi": hi}
            ep, raw, (listing,) = self.time_both(path if answer is not None else None, [RAW_LISTING.format(**fmt)])
            scanned = int(self.ch.query(RAW_ROWS_ALL.format(**fmt))[0][0])
            row = {"tf": tf, "lo": lo, "hi": hi, "rows": scanned, "ep": ep, "raw": raw}
            if answer is not None:
                row["check"] = self.check_listing(tf, answer, listing)
            rows.append(row)
            log(row_line(row))
        return rows

    def check_listing(self, tf: str, answer: dict, listing: list[list[str]]) -> dict:
        raw = {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in listing}
        ads = answer.get("ads") or []
        wrong, max_uq = [], 0
        for a in ads:
            want = raw.get(a.get("adId"), (0, 0, 0))
            if (a.get("impressions"), a.get("clicks")) != want[:2]:
                wrong.append(f"{a.get('adId')}: impressions/clicks {a.get('impressions')}/{a.get('clicks')}, "
                             f"raw {want[0]}/{want[1]}")
            if isinstance(a.get("uniqueClicks"), int):
                max_uq = max(max_uq, abs(a["uniqueClicks"] - want[2]))
        listed = {a.get("adId") for a in ads}
        missing = [ad for ad in raw if ad not in listed]
        if len(ads) >= len(raw) and missing:
            wrong.append(f"ads with events not listed: {', '.join(missing)}")
        clicks = [a.get("clicks") or 0 for a in ads]
        if clicks != sorted(clicks, reverse=True):
            wrong.append("not ordered by clicks, busiest first")
        for w in wrong:
            self.errors.append(f"listing timeframe={tf}: {w}")
        return {"listed": f"{len(ads)} of {answer.get('total')}", "counts": "ok" if not wrong else f"{len(wrong)} wrong",
                "unique": f"largest difference {max_uq}"}


def _bucket(starts: list[int], t: int) -> int:
    """Index of the last start <= t (starts sorted, t >= starts[0])."""
    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= t:
            lo = mid
        else:
            hi = mid - 1
    return lo


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def stats(row: dict) -> dict:
    ep, raw = row["ep"], row["raw"]
    s = {"raw50": percentile(raw, 50), "raw99": percentile(raw, 99), "ep50": None, "ep99": None,
         "x50": None, "x99": None}
    if ep:
        s["ep50"], s["ep99"] = percentile(ep, 50), percentile(ep, 99)
        s["x50"], s["x99"] = s["raw50"] / s["ep50"], s["raw99"] / s["ep99"]
    return s


def ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}×"


def row_line(row: dict) -> str:
    s = stats(row)
    return (f"{row['tf']:>4}: endpoint p50 {ms(s['ep50'])} p99 {ms(s['ep99'])}; raw SQL p50 {ms(s['raw50'])} "
            f"p99 {ms(s['raw99'])} over {row['rows']} rows; ratio p50 {ratio(s['x50'])} p99 {ratio(s['x99'])}")


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**NOT MET**")


def timing_table(rows: list[dict]) -> list[str]:
    out = ["| timeframe | window (UTC) | raw rows | endpoint p50 | endpoint p99 | raw SQL p50 | raw SQL p99 "
           "| raw/endpoint p50 | raw/endpoint p99 | p99 ≤ 50 ms |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        s = stats(r)
        ok = None if s["ep99"] is None else s["ep99"] * 1000 <= P99_TARGET_MS
        out.append(f"| {r['tf']} | {iso(r['lo'])} .. {iso(r['hi'])} | {r['rows']:,} | {ms(s['ep50'])} | {ms(s['ep99'])} "
                   f"| {ms(s['raw50'])} | {ms(s['raw99'])} | {ratio(s['x50'])} | {ratio(s['x99'])} | {met(ok)} |")
    return out


def log(msg: str) -> None:
    print(f"bench.py: {msg}", file=sys.stderr, flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--app", required=True, help="adbeacon's base URL")
    p.add_argument("--clickhouse", required=True, help="ClickHouse's HTTP URL")
    p.add_argument("--database", required=True)
    p.add_argument("--ad", required=True, help="the ad to time (the hottest)")
    p.add_argument("--requests", type=int, default=500, help="timed requests per timeframe and side")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests before those")
    p.add_argument("--block", type=int, default=10, help="requests per side before the other side's turn")
    p.add_argument("--out", required=True, help="markdown report")
    p.add_argument("--note", default="", help="a line about the data, for the report")
    args = p.parse_args()
    if args.requests < 1 or args.warmup < 0 or args.block < 1:
        p.error("--requests and --block must be >= 1 and --warmup >= 0")

    bench = Bench(args)
    log(f"{args.requests} timed requests per timeframe and side in turns of {args.block}, "
        f"after {args.warmup} warm-up requests")
    log(f"one ad ({args.ad}):")
    ad_rows = bench.run_ad()
    log("every ad:")
    list_rows = bench.run_listing()

    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    md = [f"<!-- scripts/bench-analytics.sh, {when} -->", ""]
    if args.note:
        md += [f"Data: {args.note}.", ""]
    turns = "request by request" if args.block == 1 else f"in runs of {args.block} requests"
    md += [f"Timing: {args.requests} requests per timeframe and side, the two sides taking turns {turns}, "
          f"after {args.warmup} warm-up requests; the endpoint on one keep-alive connection. Raw SQL: the same numbers computed from `events` for the "
          "endpoint's own [from, to), through ClickHouse's HTTP interface.", ""]
    if bench.endpoint_missing:
        md += ["**GET /ads/analytics does not exist yet (404): only the raw SQL was timed, over windows "
               "computed here.**", ""]
    md += [f"### GET /ads/analytics?adId=…&timeframe=… (ad {args.ad})", "",
           "Raw SQL: the per-hour series, and every total of the answer in one pass (each kind, unique "
           "clicks, playback, VAST errors by code, filtered traffic by reason): two queries sent "
           "concurrently (the endpoint sends one, reading series, totals, VAST errors and filtered "
           "traffic from ad_counts).", ""]
    md += timing_table(ad_rows)
    md += ["", "### GET /ads/analytics?timeframe=… (every ad)", "",
           "Raw SQL: per ad impressions, clicks and unique clicks over the window, busiest first, top 100.", ""]
    md += timing_table(list_rows)

    if not bench.endpoint_missing:
        md += ["", "### Endpoint vs raw table, same window", "",
               "| timeframe | impressions | totalClicks | uniqueClicks endpoint / raw (diff) | series buckets "
               "| hourlyClicks | video | errors, filtered | listing: ads | listing: impressions, clicks "
               "| listing: uniqueClicks |",
               "|---|---:|---:|---:|---|---|---|---|---|---|---|"]
        for a, lrow in zip(ad_rows, list_rows):
            c, lc = a.get("check"), lrow.get("check")
            if not c or not lc:
                continue
            md.append(f"| {a['tf']} | {c['impressions']} | {c['clicks']} | {c['unique']} | {c['series']} | "
                      f"{c['hourly']} | {c['video']} | {c['quality']} | {lc['listed']} | {lc['counts']} | {lc['unique']} |")

    # Targets.
    md += ["", "### Targets", ""]
    verdicts = []
    for name, rows in (("one ad", ad_rows), ("every ad", list_rows)):
        over = [f"{r['tf']} ({ms(stats(r)['ep99'])})" for r in rows
                if stats(r)["ep99"] is not None and stats(r)["ep99"] * 1000 > P99_TARGET_MS]
        ok = None if bench.endpoint_missing or any(r["ep"] is None for r in rows) else not over
        verdicts.append(ok)
        md.append(f"- p99 ≤ {P99_TARGET_MS:.0f} ms for every timeframe, {name}: {met(ok)}"
                  + (f" (over: {', '.join(over)})" if over else ""))
    r30 = stats(next(r for r in ad_rows if r["tf"] == RATIO_TIMEFRAME))
    for key, label in (("x50", "p50"), ("x99", "p99")):
        ok = None if r30[key] is None else r30[key] >= RATIO_TARGET
        verdicts.append(ok)
        md.append(f"- {RATIO_TIMEFRAME}, one ad: endpoint ≥ {RATIO_TARGET:.0f}× faster than the raw SQL at {label}: "
                  f"{met(ok)} ({ratio(r30[key])})")
    if bench.errors:
        md += ["", f"### Problems ({len(bench.errors)})", ""] + [f"- {e}" for e in bench.errors]
    all_met = all(v is True for v in verdicts)
    md += ["", f"**All targets met: {'yes' if all_met else 'no'}; endpoint numbers "
               f"{'agree with the raw table' if not bench.errors and not bench.endpoint_missing else 'NOT verified' if bench.endpoint_missing else 'DIFFER from the raw table or errors (see Problems)'}.**"]

    text = "\n".join(md) + "\n"
    print("\n" + text)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    if bench.endpoint_missing:
        log("GET /ads/analytics answered 404: the endpoint does not exist yet")
        return 2
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
