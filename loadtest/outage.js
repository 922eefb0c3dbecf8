// ClickHouse goes away and comes back while ad views keep coming. adbeacon keeps answering: 2xx
// while its buffer (and, in the default ACK_MODE=wal, its log) holds the events, 503 with
// Retry-After once the buffer is full (nothing stored: the client may retry), and 2xx again once
// ClickHouse is back and the buffer drains. Afterwards every event that got a 2xx must be in
// ClickHouse, once.
//
// k6 cannot stop ClickHouse: whoever runs the script does, during the run. `make loadtest`
// (scripts/loadtest.sh) stops its private ClickHouse OUTAGE_AT (15) seconds into the run and
// starts it OUTAGE_FOR (20) seconds later, with adbeacon's buffer set small (BUFFER_MAX_BYTES
// 1MiB, about 10,000 events) so that it fills within the outage. By hand, against `make run`:
//
//   k6 run --address localhost:6565 -e DURATION=90s loadtest/outage.js
//   # meanwhile, in another terminal: 20 s in, `bash scripts/stack.sh stop clickhouse`;
//   # 40 s later, `bash scripts/stack.sh start`
//
// VIEWS ad views per second (300) for DURATION (60s). Phases, by seconds into the load: before
// OUTAGE_AT (15), down for OUTAGE_FOR (20) (give k6 the times the outage is made at; a second
// of slack at each end for k6's own start), recovering, and the last TAIL seconds (10), "after":
// by then ClickHouse must be back, and every answer there must be a 2xx.
// Thresholds: only 2xx and 503 (with Retry-After); ClickHouse seen unavailable at least once
// (else there was no outage to speak of); events acknowledged while it was down (the buffer and
// the log hold them); with EXPECT_BUFFER_FULL=1 (`make loadtest`, whose adbeacon has a small
// buffer and no Redis) the buffer seen full; before and after the outage p95 under P95_MS
// (50 ms) and p99 under P99_MS (100 ms); while it is down p99 under DOWN_P99_MS (250 ms): a 503
// is as quick as a 2xx; no 503 in the after phase; every 2xx stored.
import exec from 'k6/execution';
import * as lib from './lib.js';

const VIEWS = Number(__ENV.VIEWS || 300);
const DURATION = __ENV.DURATION || '60s';
const TAIL = Number(__ENV.TAIL || 10);
const OUTAGE_AT = Number(__ENV.OUTAGE_AT || 15);
const OUTAGE_FOR = Number(__ENV.OUTAGE_FOR || 20);
const P95_MS = Number(__ENV.P95_MS || 50);
const P99_MS = Number(__ENV.P99_MS || 100);
const DOWN_P99_MS = Number(__ENV.DOWN_P99_MS || 250);
const afterStart = lib.durationSeconds(DURATION) - TAIL;
if (OUTAGE_AT + OUTAGE_FOR >= afterStart) {
  throw new Error(`the outage (OUTAGE_AT ${OUTAGE_AT} + OUTAGE_FOR ${OUTAGE_FOR} s) must end before the last TAIL (${TAIL}) s of DURATION ${DURATION}`);
}

export const options = Object.assign({}, lib.COMMON_OPTIONS, {
  scenarios: {
    views: lib.arrivalRate(VIEWS, DURATION, 50, 4),
    monitor: lib.monitorScenario(DURATION),
  },
  thresholds: lib.thresholds(
    Object.assign(
      {
        clickhouse_unavailable_polls: ['count>0'],
        'events_acked{phase:down}': ['count>0'],
        'http_req_failed{phase:after}': ['rate==0'],
        'http_req_duration{phase:before}': [`p(95)<${P95_MS}`, `p(99)<${P99_MS}`],
        'http_req_duration{phase:down}': [`p(99)<${DOWN_P99_MS}`],
        'http_req_duration{phase:after}': [`p(95)<${P95_MS}`, `p(99)<${P99_MS}`],
        // Shown in the summary: how the outage went.
        'status_503{phase:down}': ['rate>=0'],
        'http_req_duration{phase:recovering}': ['max>=0'],
        adbeacon_held_events: ['max>=0'],
      },
      { buffer_full_polls: [__ENV.EXPECT_BUFFER_FULL === '1' ? 'count>0' : 'count>=0'] },
    ),
  ),
});

function phase() {
  const elapsed = (Date.now() - exec.scenario.startTime) / 1000;
  if (elapsed < OUTAGE_AT + 1) return 'before';
  if (elapsed < OUTAGE_AT + OUTAGE_FOR - 1) return 'down';
  if (elapsed < afterStart) return 'recovering';
  return 'after';
}

export function setup() {
  return lib.setupRun(20);
}

export default function (data) {
  // Every metric of the iteration, the requests' and lib.js's counters, carries the phase.
  exec.vu.metrics.tags.phase = phase();
  lib.adView(data, { allow503: true });
}

export function monitor() {
  lib.monitor();
}

export function teardown(data) {
  lib.teardownRun(data);
}
