// Long and steady: mixed.js's ad views at a moderate rate for a long time, with the service
// watched every second (events it holds, the size of its write-ahead log): what a soak should
// show is that nothing grows, latency stays put and every 2xx is stored.
//
//   k6 run --address localhost:6565 -e DURATION=30m loadtest/soak.js
//
// VIEWS ad views per second (200, about 650 requests and 800 events per second) for DURATION
// (30m; `make loadtest` runs 60s, SOAK_DURATION there), over the active ads and ADS created ones
// (40), from CLIENTS addresses.
// Thresholds: every answer a 2xx, p95 under P95_MS (50 ms) and p99 under P99_MS (100 ms) for each
// kind of request, at most HELD_MAX events held at any look (10,000, some 12 seconds of this
// traffic: ClickHouse keeps up), a log of at most WAL_MAX_MIB (256) MiB, and every 2xx stored.
// The log's limit tells a log that deletes its segments from one that does not only when it is
// well under the traffic's total: `make loadtest` runs adbeacon with WAL_SEGMENT_BYTES=1MiB and
// sets WAL_MAX_MIB=4 (the run writes some 3 MiB of log in all); by hand, pick them likewise.
import * as lib from './lib.js';

const VIEWS = Number(__ENV.VIEWS || 200);
const DURATION = __ENV.DURATION || '30m';

export const options = Object.assign({}, lib.COMMON_OPTIONS, {
  scenarios: {
    views: lib.arrivalRate(VIEWS, DURATION, 50, 4),
    monitor: lib.monitorScenario(DURATION),
  },
  thresholds: lib.thresholds(
    Object.assign(lib.viewLatency(), {
      'http_req_failed{load:yes}': ['rate==0'],
      dropped_iterations: lib.keptUp(VIEWS, DURATION),
      adbeacon_held_events: [`max<${Number(__ENV.HELD_MAX || 10000)}`],
      adbeacon_wal_mib: [`max<${Number(__ENV.WAL_MAX_MIB || 256)}`],
    }),
  ),
});

export function setup() {
  return lib.setupRun(40);
}

export default function (data) {
  lib.adView(data);
}

export function monitor() {
  lib.monitor();
}

export function teardown(data) {
  lib.teardownRun(data);
}
