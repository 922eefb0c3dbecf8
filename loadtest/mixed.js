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

export const options = Object.assign({}, lib.COMMON_OPTIONS, {
  scenarios: { views: lib.arrivalRate(VIEWS, DURATION, 100, 3) },
  thresholds: lib.thresholds(
    Object.assign(lib.viewLatency(), {
      'http_req_failed{load:yes}': ['rate==0'],
      dropped_iterations: lib.keptUp(VIEWS, DURATION),
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
