// A spike: from a steady BASE requests per second up to PEAK, far beyond what this machine can
// serve with k6 on it, held, and back down. Under overload adbeacon may answer 503 with
// Retry-After (its buffer is full: nothing stored, the client retries); every other answer must
// be a 2xx, and once the spike is over the service must be as fast and error-free as before.
//
//   k6 run --address localhost:6565 -e BASE=500 -e PEAK=8000 loadtest/spike.js
//
// Stages (seconds, each settable): BEFORE (10) at BASE, RAMP_UP (10) to PEAK, HOLD (15) at PEAK,
// RAMP_DOWN (5) to BASE, GRACE (5) at BASE, AFTER (15) at BASE. Requests are tagged with their
// phase: before, spike (ramp up, hold, ramp down, grace) and after. One request per iteration:
// pixels (75 %), JSON impressions (8 %), batches of 10 to 100 progress events (15 %), clicks
// (2 %). VUS (50) are allocated up front, up to MAX_VUS (200) under load; past that k6 drops
// iterations (counted in dropped_iterations, which the summary shows: the offered load k6 could
// not send).
// Thresholds: only 2xx and 503 (with Retry-After); before and after the spike p95 under P95_MS
// (50 ms), p99 under P99_MS (100 ms) and no 503; every 2xx stored.
import exec from 'k6/execution';
import * as lib from './lib.js';

const BASE = Number(__ENV.BASE || 500);
const PEAK = Number(__ENV.PEAK || 8000);
const P95_MS = Number(__ENV.P95_MS || 50);
const P99_MS = Number(__ENV.P99_MS || 100);
const stage = (name, dflt) => Number(__ENV[name] || dflt);
const BEFORE = stage('BEFORE', 10);
const RAMP_UP = stage('RAMP_UP', 10);
const HOLD = stage('HOLD', 15);
const RAMP_DOWN = stage('RAMP_DOWN', 5);
const GRACE = stage('GRACE', 5);
const AFTER = stage('AFTER', 15);

const spikeStart = BEFORE;
const afterStart = BEFORE + RAMP_UP + HOLD + RAMP_DOWN + GRACE;

export const options = Object.assign({}, lib.COMMON_OPTIONS, {
  scenarios: {
    spike: {
      executor: 'ramping-arrival-rate',
      startRate: BASE,
      timeUnit: '1s',
      preAllocatedVUs: Number(__ENV.VUS || 50),
      maxVUs: Number(__ENV.MAX_VUS || 200),
      stages: [
        { target: BASE, duration: `${BEFORE}s` },
        { target: PEAK, duration: `${RAMP_UP}s` },
        { target: PEAK, duration: `${HOLD}s` },
        { target: BASE, duration: `${RAMP_DOWN}s` },
        { target: BASE, duration: `${GRACE + AFTER}s` },
      ],
    },
  },
  thresholds: lib.thresholds({
    'http_req_duration{phase:before}': [`p(95)<${P95_MS}`, `p(99)<${P99_MS}`],
    'http_req_duration{phase:after}': [`p(95)<${P95_MS}`, `p(99)<${P99_MS}`],
    'http_req_failed{phase:before}': ['rate==0'],
    'http_req_failed{phase:after}': ['rate==0'],
    // Shown in the summary: how the spike itself went.
    'http_req_duration{phase:spike}': ['max>=0'],
    'status_503{phase:spike}': ['rate>=0'],
  }),
});

export function setup() {
  return lib.setupRun(40);
}

function phase() {
  const elapsed = (Date.now() - exec.scenario.startTime) / 1000;
  if (elapsed < spikeStart) return 'before';
  if (elapsed < afterStart) return 'spike';
  return 'after';
}

const KINDS = ['start', 'firstQuartile', 'midpoint', 'thirdQuartile', 'complete'];

export default function (data) {
  // Every metric of the iteration, the requests' and lib.js's counters, carries the phase.
  exec.vu.metrics.tags.phase = phase();
  const opts = { allow503: true };
  const ad = lib.pick(data.ads);
  const v = lib.viewer();
  const r = Math.random();
  if (r < 0.75) {
    // A pixel goes to one of the run's own ads (see lib.pixel).
    lib.pixel(data, lib.pick(['impression'].concat(KINDS)), lib.pick(data.created), v, Math.random() * 30, opts);
  } else if (r < 0.83) {
    lib.impression(data, ad, v, opts);
  } else if (r < 0.98) {
    const n = 10 + Math.floor(Math.random() * 91);
    const items = [];
    for (let i = 0; i < n; i++) items.push({ adId: lib.pick(data.ads), kind: lib.pick(KINDS), playbackTime: Math.random() * 30 });
    lib.batch(data, items, v, opts);
  } else {
    lib.click(data, ad, v, opts);
  }
}

export function teardown(data) {
  lib.teardownRun(data);
}
