# Prints the table of a `make loadtest` run (scripts/loadtest.sh) from the k6 summaries
# (`k6 run --summary-export`) of its scripts, as Markdown: the load requests (tagged load:yes,
# not setup's and teardown's), their rate over the load's length (load_seconds), p50/p95/p99,
# the non-2xx and 503 shares, the books (events acknowledged, stored, lost) and the thresholds.
#
#   python3 loadtest/report.py DIR "clicks mixed ..." REV NPROC LOADAVG

import json, sys, time

tmp, scripts, rev, ncpu, load = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4], sys.argv[5]
when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
print()
print(f"<!-- scripts/loadtest.sh, {when}, rev {rev}, nproc {ncpu}, load avg after the runs {load} -->")
print("| script | requests | req/s | p50 | p95 | p99 | non-2xx | of which 503 | events acknowledged | stored | lost | thresholds |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for s in scripts:
    try:
        with open(f"{tmp}/summary-{s}.json") as f:
            m = json.load(f)["metrics"]
    except (OSError, ValueError, KeyError):
        print(f"| {s} | no summary | | | | | | | | | | |")
        continue
    # The load's requests only (tagged load:yes): not setup's and teardown's.
    count = lambda name: m.get(name, {}).get("count", 0)
    dur = m.get("http_req_duration{load:yes}", {})
    reqs = count("http_reqs{load:yes}")
    secs = count("load_seconds")
    ms = lambda x: f"{x:.1f} ms" if x < 100 else f"{x:,.0f} ms"
    # In summary-export, a threshold's value is true when it was crossed.
    crossed = [f"`{k}` {t}" for k, v in m.items() for t, bad in (v.get("thresholds") or {}).items() if bad]
    print(
        f"| {s} | {reqs:,} | {reqs / secs if secs else 0:,.0f} | {ms(dur.get('med', 0))} | {ms(dur.get('p(95)', 0))} "
        f"| {ms(dur.get('p(99)', 0))} | {100 * m.get('http_req_failed{load:yes}', {}).get('value', 0):.2f} % "
        f"| {100 * m.get('status_503', {}).get('value', 0):.2f} % | {count('events_acked'):,} "
        f"| {count('events_stored'):,} | {count('events_lost'):,} "
        f"| {'crossed: ' + '; '.join(crossed) if crossed else 'all passed'} |"
    )
