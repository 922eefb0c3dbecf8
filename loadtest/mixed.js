// Realistic traffic: ad views over many ads and client addresses, impressions : VAST progress
// beacons : clicks about 100 : 300 : 2, from VAST players (GET /t/{event} pixels, 70 %) and SDKs
// (POST /ads/impression and POST /ads/events batches, 30 %); see adView in lib.js.
//
//   k6 run --address localhost:6565 -e VIEWS=400 -e DURATION=45s loadtest/mixed.js
//
// VIEWS ad views per second (400, about 1,300 requests and 1,600 events per second) for
// DURATION (45s), over the active ads and ADS created ones (40), from CLIENTS addresses.
// Thresholds: every answer a 2xx, p95 under P95_MS (50 ms) and p99 under P99_MS (100 ms) for
// each kind of request, and every 2xx stored.
import * as lib from './lib.js';

const VIEWS = Number(__ENV.VIEWS || 400);
const DURATION = __ENV.DURATION || '45s';
const P95_MS = Number(__ENV.P95_MS || 50);
const P99_MS = Number(__ENV.P99_MS || 100);

const latency = {};
for (const ep of ['pixel', 'impression', 'batch', 'click']) {
  latency[`http_req_duration{ep:${ep}}`] = [`p(95)<${P95_MS}`, `p(99)<${P99_MS}`];
}

export const options = Object.assign({}, lib.COMMON_OPTIONS, {
  scenarios: {
    views: {
      executor: 'constant-arrival-rate',
      rate: VIEWS,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: Number(__ENV.VUS || 100),
      maxVUs: Number(__ENV.VUS || 100) * 3,
    },
  },
  thresholds: lib.thresholds(
    Object.assign(latency, {
      'http_req_failed{load:yes}': ['rate==0'],
      // The load generator kept up: at most 1 % of the planned views not made.
      dropped_iterations: [`count<${Math.ceil(VIEWS * 0.01 * lib.durationSeconds(DURATION))}`],
    }),
  ),
});

export function setup() {
  return lib.setupRun(40);
}

export default function (data) {
  lib.adView(data);
}

export function teardown(data) {
  lib.teardownRun(data);
}
