// POST /ads/click at a constant arrival rate, with exactly the old service's body
// ({"adId","timestamp","ipAddress","videoPlaybackTime"}: no event id, as its clients sent none).
//
//   k6 run --address localhost:6565 -e RATE=2000 -e DURATION=30s loadtest/clicks.js
//
// RATE clicks per second (2000) for DURATION (30s), from VUS virtual users (100, up to 3 times
// as many when answers slow down), over ADS ads created for the run (20: without ids, the
// books find the run's clicks by their ads), from CLIENTS addresses; see lib.js for the rest.
// Thresholds: every answer the old service's 202 {"message":"Click event queued"}, p95 under
// P95_MS (50 ms), p99 under P99_MS (100 ms), and every 202 stored once.
import * as lib from './lib.js';

const RATE = Number(__ENV.RATE || 2000);
const DURATION = __ENV.DURATION || '30s';
const P95_MS = Number(__ENV.P95_MS || 50);
const P99_MS = Number(__ENV.P99_MS || 100);

export const options = Object.assign({}, lib.COMMON_OPTIONS, {
  scenarios: {
    clicks: lib.arrivalRate(RATE, DURATION, 100, 3),
  },
  thresholds: lib.thresholds({
    'http_req_duration{ep:click}': [`p(95)<${P95_MS}`, `p(99)<${P99_MS}`],
    'http_req_failed{ep:click}': ['rate==0'],
    dropped_iterations: lib.keptUp(RATE, DURATION),
  }),
});

export function setup() {
  const data = lib.setupRun(20);
  // The run's own ads only: their rows are the run's clicks.
  return Object.assign(data, { ads: data.created, idless: true });
}

export default function (data) {
  lib.click(data, lib.pick(data.ads), lib.viewer(), { idless: true });
}

export function teardown(data) {
  lib.teardownRun(data);
}
