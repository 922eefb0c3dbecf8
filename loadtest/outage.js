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
// VIEWS ad views per second (300) for DURATION (60s). The last TAIL seconds (10) are the
// "after" phase: by then ClickHouse must be back, and every answer there must be a 2xx.
// Thresholds: only 2xx and 503 (with Retry-After); ClickHouse seen unavailable at least once
// (else there was no outage to speak of); no 503 in the after phase; every 2xx stored.
import exec from 'k6/execution';
import * as lib from './lib.js';

const VIEWS = Number(__ENV.VIEWS || 300);
const DURATION = __ENV.DURATION || '60s';
const TAIL = Number(__ENV.TAIL || 10);
const afterStart = lib.durationSeconds(DURATION) - TAIL;

export const options = Object.assign({}, lib.COMMON_OPTIONS, {
  scenarios: {
    views: lib.arrivalRate(VIEWS, DURATION, 50, 4),
    monitor: lib.monitorScenario(DURATION),
  },
  thresholds: lib.thresholds({
    clickhouse_unavailable_polls: ['count>0'],
    'http_req_failed{phase:after}': ['rate==0'],
    // Shown in the summary: how the outage went.
    'status_503{phase:during}': ['rate>=0'],
    'http_req_duration{phase:during}': ['max>=0'],
    'http_req_duration{phase:after}': ['max>=0'],
    buffer_full_polls: ['count>=0'],
    adbeacon_held_events: ['max>=0'],
  }),
});

export function setup() {
  return lib.setupRun(20);
}

export default function (data) {
  const elapsed = (Date.now() - exec.scenario.startTime) / 1000;
  exec.vu.metrics.tags.phase = elapsed < afterStart ? 'during' : 'after';
  lib.adView(data, { allow503: true });
}

export function monitor() {
  lib.monitor();
}

export function teardown(data) {
  lib.teardownRun(data);
}
