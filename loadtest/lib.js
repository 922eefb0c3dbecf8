// What the k6 scripts in this folder share: settings, the player traffic (user agents, client
// addresses, event ids, ads), the status checks and the books: at the end of a run, every event
// that got a 2xx must be in ClickHouse, once.
//
// Settings (k6 run -e NAME=value, or the environment):
//   BASE_URL             adbeacon (http://127.0.0.1:8080, `make run`)
//   CLICKHOUSE_URL       its ClickHouse, HTTP interface (http://127.0.0.1:8123)
//   CLICKHOUSE_DATABASE  adbeacon's database (adbeacon)
//   CLICKHOUSE_USER, CLICKHOUSE_PASSWORD   for that ClickHouse (default, empty)
//   ADMIN_KEY            an admin API key, when adbeacon runs with API_KEYS (for POST /ads)
//   ADS                  ads created through POST /ads at setup, besides the active ones (the
//                        3 demo ads on a fresh stack): 20 for clicks.js and outage.js, else 40;
//                        at least 1 (the books find pixels and old-style clicks by them)
//   CLIENTS              distinct client addresses sent in X-Forwarded-For (20000)
//   K6_API               k6's own REST API, host:port, as given to `k6 run --address`
//                        (localhost:6565, k6's default); teardown reads the 2xx count from it
//   FLUSH_WAIT           seconds teardown waits for adbeacon to store what it holds (90)
//   RUN_TAG              8 hex digits that start every event id of the run (random)
//   KEEP_ADS=1           leave the created ads active after the run (else they are retired)
//
// Client addresses: each request names a viewer in X-Forwarded-For (IPv4 from the documentation
// ranges, IPv6 /64s of 2001:db8::/32: header values only, no traffic goes there). adbeacon reads
// it only from a proxy in TRUSTED_PROXIES, so run it with TRUSTED_PROXIES=127.0.0.1; without
// that, every request comes from 127.0.0.1 and the per-address RATE_LIMIT (500/s) answers 429.
//
// User agents are players' and browsers', so every event is judged as a viewer's (valid, or a
// duplicate click under DEDUP_WINDOW); the books count every stored row, whatever its traffic
// class, and teardown prints the classes.
import http from 'k6/http';
import exec from 'k6/execution';
import { check, sleep } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';
import encoding from 'k6/encoding';

export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
const CLICKHOUSE_URL = (__ENV.CLICKHOUSE_URL || 'http://127.0.0.1:8123').replace(/\/+$/, '');
const CLICKHOUSE_DATABASE = __ENV.CLICKHOUSE_DATABASE || 'adbeacon';
const K6_API = 'http://' + (__ENV.K6_API || 'localhost:6565');
const FLUSH_WAIT = Number(__ENV.FLUSH_WAIT || 90);
const CLIENTS = Math.max(1, Number(__ENV.CLIENTS || 20000));

// ------------------------------------------------------------------ metrics
// Events, not requests: a batch carries many. Every event sent carries a client eventId.
const eventsSent = new Counter('events_sent');
/** Events a 2xx answered for: a JSON 2xx, a pixel's 200/204, a batch item "accepted". */
const eventsAcked = new Counter('events_acked');
/**
 * The sum of the acknowledged events' keys (eventKey: the event's id, kind and ad folded into a
 * number), which teardown recomputes from the stored rows: equal counts alone would let a lost
 * event and one stored though refused cancel out, and would not see a kind or an ad stored wrong.
 */
const eventsAckedKeys = new Counter('events_acked_keys');
/** Events answered 503 (overload or outage): nothing stored, the client may retry. */
const eventsRefused = new Counter('events_refused');
/** Events whose request got no answer (timeout, reset): stored or not, nobody knows. */
const eventsUncertain = new Counter('events_uncertain');
// Set once, by teardown.
const eventsStored = new Counter('events_stored');
const eventsLost = new Counter('events_lost'); // acknowledged, not in ClickHouse
const eventsStoredTwice = new Counter('events_stored_twice'); // rows beyond one per event id
const eventsUnexplained = new Counter('events_stored_unacked'); // stored, yet refused or never sent
const booksOff = new Counter('books_off'); // |adbeacon_books_balance| + events still held, at rest
/** 1 when the stored rows' keys do not sum to the acknowledged events' (see events_acked_keys). */
const keysOff = new Counter('events_keys_off');
/** 1 per aggregate table (ad_stats_hourly, ad_stats_minutely, ad_counts' two grains) whose numbers
 * for the run's ads differ from a recount of their raw rows. */
const aggregatesOff = new Counter('aggregates_off');
/** Seconds from the end of setup to the start of teardown: the load's length, for req/s. */
const loadSeconds = new Counter('load_seconds');
/** 1 for every answer outside what the script allows (4xx, 5xx other than an allowed 503, none). */
const unexpected = new Rate('unexpected_status');
/** 503s without Retry-After (adbeacon always sends one). */
const noRetryAfter = new Counter('status_503_without_retry_after');
/** 503 share of the load requests (overload, outage). */
const overloaded = new Rate('status_503');

/** Trend stats shown in the summary: p50 is `med`. */
export const SUMMARY_TREND_STATS = ['min', 'med', 'p(95)', 'p(99)', 'max', 'count'];

/**
 * Thresholds every script has: no answer outside the allowed ones, and the books (every 2xx
 * stored once; adbeacon's own books balanced). `extra` adds the script's latency limits.
 */
export function thresholds(extra) {
  return Object.assign(
    {
      unexpected_status: ['rate==0'],
      // The statuses above, and every item of a 202 batch accepted.
      checks: ['rate==1'],
      status_503_without_retry_after: ['count==0'],
      events_acked: ['count>0'],
      // Listed so that the summary shows the load's requests apart from setup's and teardown's.
      'http_req_duration{load:yes}': ['max>=0'],
      'http_req_failed{load:yes}': ['rate>=0'],
      'http_reqs{load:yes}': ['count>0'],
      events_lost: ['count==0'],
      events_stored_twice: ['count==0'],
      events_stored_unacked: ['count==0'],
      events_keys_off: ['count==0'],
      aggregates_off: ['count==0'],
      books_off: ['count==0'],
    },
    extra || {},
  );
}

// ------------------------------------------------------------------ viewers
const PLAYER_AGENTS = [
  'Mozilla/5.0 (SMART-TV; Linux; Tizen 7.0) AppleWebKit/537.36 (KHTML, like Gecko) Version/7.0 TV Safari/537.36',
  'Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36',
  'Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1',
  'Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36',
  'AppleCoreMedia/1.0.0.21H16 (Apple TV; U; CPU OS 17_6 like Mac OS X; en_us)',
  'Roku/DVP-14.0 (14.0.4.5040-46)',
  'ExoPlayerLib/2.19.1',
];

function hex(n, width) {
  return n.toString(16).padStart(width, '0');
}

/** Client address number i (0 <= i < CLIENTS) as X-Forwarded-For names it. */
export function clientAddress(i) {
  if (i < 768) {
    // 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 (RFC 5737).
    return ['192.0.2.', '198.51.100.', '203.0.113.'][i >> 8] + (i & 255);
  }
  // adbeacon limits and counts IPv6 clients per /64: one /64 each.
  return `2001:db8:${hex(i >> 16, 1)}:${hex(i & 0xffff, 1)}::${hex(1 + (i % 7), 1)}`;
}

/** A viewer: a client address and a player user agent. */
export function viewer() {
  const i = Math.floor(Math.random() * CLIENTS);
  return {
    ip: clientAddress(i),
    agent: PLAYER_AGENTS[i % PLAYER_AGENTS.length],
  };
}

export function pick(list) {
  return list[Math.floor(Math.random() * list.length)];
}

// ------------------------------------------------------------------ event ids
// RUN_TAG-VVVV-4SSS-8SSS-SSSSSSSSSSSS: the run's tag, the VU, a per-VU sequence. Unique without
// randomness, valid UUIDs (version 4 and variant bits set), and one run's events are found in
// ClickHouse by their first 8 characters.
let sequence = 0;
export function eventId(tag) {
  sequence += 1;
  const s = hex(sequence, 18);
  return `${tag}-${hex(exec.vu.idInTest & 0xffff, 4)}-4${s.slice(0, 3)}-8${s.slice(3, 6)}-${s.slice(6)}`;
}

/** The `kind` column's Enum8 values (clickhouse/migrations/0002_events.sql). */
const KIND_CODE = {
  impression: 1,
  click: 2,
  creative_view: 3,
  start: 4,
  first_quartile: 5,
  midpoint: 6,
  third_quartile: 7,
  complete: 8,
};

/** A pixel's event name or a batch item's kind (camelCase) as the `kind` column stores it. */
function storedKind(name) {
  return name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
}

/**
 * An event's key for the books: its id (the VU and the low 48 bits of its sequence; 0 for an
 * event sent without an id), its kind and its ad (its index in data.ads), folded into a number
 * below 2^28, so that the sum over millions of events stays exact in a float64 counter. teardown
 * computes the same from each stored row (keysSql), so the sums agree only when the rows are the
 * acknowledged events with their kinds and ads.
 */
export function eventKey(data, id, kind, ad) {
  // Built once per VU (setup's data cannot hold it: k6 hands each VU a read-only copy).
  if (adIndex === null) adIndex = new Map(data.ads.map((a, i) => [a, i]));
  const base = id ? (parseInt(id.slice(9, 13), 16) * 65599 + parseInt(id.slice(24, 36), 16)) % 65521 : 0;
  return (base * 16 + KIND_CODE[storedKind(kind)]) * 256 + adIndex.get(ad) + 1;
}
let adIndex = null;

/** SQL for the sum of eventKey over the distinct stored rows matched by `where`. */
function keysSql(data, where) {
  const ads = data.ads.map((a) => `'${a}'`).join(',');
  // A pixel's row has an id of adbeacon's making (see pixel()): keyed without one.
  const base = data.idless
    ? '0'
    : `if(substring(id, 1, 8) = '${data.tag}', (toUInt64(reinterpretAsUInt16(reverse(unhex(substring(id, 10, 4))))) * 65599` +
      ' + reinterpretAsUInt64(reverse(unhex(substring(id, 25, 12))))) % 65521, 0)';
  return (
    `SELECT sum(((${base}) * 16 + toUInt64(toInt8(kind))) * 256 + indexOf([${ads}], toString(ad_id)))` +
    ` FROM (SELECT DISTINCT toString(event_id) AS id, kind, ad_id FROM events WHERE ${where}) FORMAT TSV`
  );
}

export function nowIso() {
  return new Date().toISOString();
}

// ------------------------------------------------------------------ requests
// `opts` of the request helpers: allow503 (overload, outage: a 503 with Retry-After is an
// allowed answer). Scripts that tag their metrics (a spike's phase) set exec.vu.metrics.tags.

/** A load request's tags: load:yes (setup and teardown requests lack it), ep and name. */
function tags(ep, name) {
  return { load: 'yes', ep, name };
}

function headers(v, json) {
  const h = { 'User-Agent': v.agent, 'X-Forwarded-For': v.ip };
  if (json) h['Content-Type'] = 'application/json';
  return h;
}

/**
 * Books one answer for the events whose keys (eventKey) are `keys`: 2xx acknowledges them all
 * (unless `accepted` lists the keys of a batch's accepted items), 503 refuses them (allowed only
 * when `allow503`), no answer leaves them uncertain. Returns whether the answer was a 2xx.
 */
export function book(res, keys, allow503, accepted) {
  const events = keys.length;
  eventsSent.add(events);
  const ok = res.status >= 200 && res.status < 300;
  const is503 = res.status === 503;
  overloaded.add(is503);
  if (ok) {
    const acked = accepted === undefined ? keys : accepted;
    eventsAcked.add(acked.length);
    eventsAckedKeys.add(acked.reduce((sum, k) => sum + k, 0));
  } else if (is503) {
    eventsRefused.add(events);
    if (!res.headers['Retry-After']) noRetryAfter.add(1);
  } else if (res.status === 0) {
    eventsUncertain.add(events);
  }
  const allowed = ok || (allow503 && is503);
  unexpected.add(!allowed);
  check(res, { [allow503 ? '2xx or 503' : '2xx']: () => allowed });
  // A few, not every one: the first ones usually say it all.
  if (!allowed && exec.vu.iterationInScenario < 3) {
    const hint = res.status === 429 ? ' (is adbeacon running with TRUSTED_PROXIES=127.0.0.1? see lib.js)' : '';
    const what = res.status === 0 ? `no answer: ${res.error}` : `${res.status} ${String(res.body).slice(0, 200)}`;
    console.warn(`warning: ${res.request ? res.request.method : ''} ${res.url} -> ${what}${hint}`);
  }
  return ok;
}

/**
 * POST /ads/click with the old service's body; with an eventId too unless `opts.idless` (the
 * old clients sent none: clicks.js sends exactly their body).
 */
export function click(data, ad, v, opts) {
  const fields = {
    adId: ad,
    timestamp: nowIso(),
    ipAddress: v.ip,
    videoPlaybackTime: Math.round(Math.random() * 1200) / 10,
  };
  if (!(opts && opts.idless)) fields.eventId = eventId(data.tag);
  const res = http.post(`${BASE_URL}/ads/click`, JSON.stringify(fields), {
    headers: headers(v, true),
    tags: tags('click', 'POST /ads/click'),
  });
  const ok = book(res, [eventKey(data, fields.eventId, 'click', ad)], opts && opts.allow503);
  // The old service's answer ("duplicate": true added for a repeat of a counted click).
  const queued = (r) =>
    r.status === 202 &&
    (r.body === '{"message":"Click event queued"}' || r.body === '{"message":"Click event queued","duplicate":true}');
  if (ok) check(res, { 'click: 202 {"message":"Click event queued"}': queued });
  return ok;
}

/** POST /ads/impression with `{"adId","eventId"}`. */
export function impression(data, ad, v, opts) {
  const id = eventId(data.tag);
  const res = http.post(`${BASE_URL}/ads/impression`, JSON.stringify({ adId: ad, eventId: id }), {
    headers: headers(v, true),
    tags: tags('impression', 'POST /ads/impression'),
  });
  return book(res, [eventKey(data, id, 'impression', ad)], opts && opts.allow503);
}

/**
 * GET /t/{event}?ad=…&eid=…&ts=…&pt=… as a VAST player fires it (GIF or, with f=204, empty).
 * `eid`: the play's transaction id (VAST 4.1's [TRANSACTIONID], the same on each of its beacons),
 * else a fresh one. adbeacon stores a beacon's eid per ad and kind, as an id of its own, so the
 * books find pixels by their ad, which must be one the run created, and key them without an id.
 */
export function pixel(data, event, ad, v, playhead, opts, eid) {
  const id = eid || eventId(data.tag);
  let url = `${BASE_URL}/t/${event}?ad=${ad}&eid=${id}&ts=${encodeURIComponent(nowIso())}`;
  if (playhead !== undefined) url += `&pt=${playheadText(playhead)}`;
  url += `&cb=${Math.floor(Math.random() * 1e8)}`;
  if (Math.random() < 0.5) url += '&f=204';
  const res = http.get(url, {
    headers: headers(v, false),
    tags: tags('pixel', `GET /t/${event}`),
  });
  return book(res, [eventKey(data, null, event, ad)], opts && opts.allow503);
}

/** VAST's [ADPLAYHEAD]: HH:MM:SS.mmm. */
function playheadText(seconds) {
  const ms = Math.round(seconds * 1000);
  const pad = (n, w) => String(n).padStart(w, '0');
  return `${pad(Math.floor(ms / 3600000), 2)}:${pad(Math.floor(ms / 60000) % 60, 2)}:${pad(Math.floor(ms / 1000) % 60, 2)}.${pad(ms % 1000, 3)}`;
}

/**
 * POST /ads/events with `items` ([{adId, kind, playbackTime?}]), each given an eventId and a
 * timestamp. 202 answers per item; only the items it calls "accepted" are acknowledged.
 */
export function batch(data, items, v, opts) {
  const ts = nowIso();
  const sent = items.map((e) => Object.assign({ eventId: eventId(data.tag), timestamp: ts }, e));
  const keys = sent.map((e) => eventKey(data, e.eventId, e.kind, e.adId));
  const res = http.post(`${BASE_URL}/ads/events`, JSON.stringify(sent), {
    headers: headers(v, true),
    tags: tags('batch', 'POST /ads/events'),
  });
  let accepted;
  if (res.status === 202) {
    const answer = res.json();
    accepted = (answer.results || []).filter((r) => r.status === 'accepted').map((r) => keys[r.index]);
    // Nothing here is a repeat or invalid: every item must be accepted.
    if (!check(answer, { 'batch: every item accepted': (a) => a.accepted === items.length && accepted.length === items.length })) {
      console.warn(`warning: batch answer ${JSON.stringify(answer).slice(0, 300)}`);
    }
  }
  return book(res, keys, opts && opts.allow503, accepted);
}

// ------------------------------------------------------------------ one ad view
// The VAST progress events a viewer reaches, with the share of views that reach each: viewers
// drop off as the ad plays, 3 beacons per impression on average (0.95 + 0.75 + 0.55 + 0.45 + 0.30).
const PROGRESS = [
  ['start', 'start', 0.95, 0],
  ['firstQuartile', 'firstQuartile', 0.75, 0.25],
  ['midpoint', 'midpoint', 0.55, 0.5],
  ['thirdQuartile', 'thirdQuartile', 0.45, 0.75],
  ['complete', 'complete', 0.3, 1],
];
/** Share of views with a click: impressions : progress beacons : clicks = 100 : 300 : 2. */
const CLICK_SHARE = 0.02;
/** Share of views reported by an SDK in JSON (the rest by a VAST player's pixels). */
const SDK_SHARE = 0.3;

/**
 * One viewer watching one ad, as its player reports it: a VAST player fires GET /t/impression
 * and a pixel per progress event reached; an SDK posts the impression (POST /ads/impression)
 * and its progress events as one batch (POST /ads/events). Either may click (POST /ads/click,
 * the old service's body). Back to back, without the ad's real 15 to 30 seconds between them,
 * so that a few VUs make the traffic of many viewers. `opts.allow503` for overload and outage.
 */
export function adView(data, opts) {
  const sdk = Math.random() < SDK_SHARE;
  // A player's pixels go to the run's own ads (see pixel()).
  const ad = pick(sdk ? data.ads : data.created);
  const v = viewer();
  const length = pick([15, 20, 30]);
  const reached = Math.random();
  const clickAt = Math.random() < CLICK_SHARE ? Math.random() : -1;
  if (sdk) {
    impression(data, ad, v, opts);
    const items = [];
    for (const [, kind, share, at] of PROGRESS) {
      if (reached < share) items.push({ adId: ad, kind, playbackTime: at * length });
    }
    if (items.length > 0) batch(data, items, v, opts);
  } else {
    // One transaction id on every beacon of the play, as a VAST 4.1 player expands it.
    const transaction = eventId(data.tag);
    pixel(data, 'impression', ad, v, undefined, opts, transaction);
    for (const [event, , share, at] of PROGRESS) {
      if (reached < share) pixel(data, event, ad, v, at * length, opts, transaction);
    }
  }
  if (clickAt >= 0) click(data, ad, v, opts);
}

// ------------------------------------------------------------------ watching the service
const heldEvents = new Trend('adbeacon_held_events');
const walMiB = new Trend('adbeacon_wal_mib');
/** Readiness polls that found ClickHouse unavailable (outage.js: proof that the outage happened). */
const clickhouseDown = new Counter('clickhouse_unavailable_polls');
const bufferFull = new Counter('buffer_full_polls');

/**
 * One look at the service, for a `monitor` scenario (one VU, an iteration a second): the events
 * it holds and the size of its log (/metrics), and what /readyz says of ClickHouse and the buffer.
 */
export function monitor() {
  const m = http.get(`${BASE_URL}/metrics`, { tags: { name: 'monitor' } });
  if (m.status === 200) {
    const held = metric(m.body, /^adbeacon_buffer_events$/);
    const wal = metric(m.body, /^adbeacon_wal_bytes$/);
    if (held !== null) heldEvents.add(held);
    if (wal !== null) walMiB.add(wal / 1048576);
  }
  const r = http.get(`${BASE_URL}/readyz`, {
    tags: { name: 'monitor' },
    responseCallback: http.expectedStatuses(200, 503),
  });
  if (r.status === 200 || r.status === 503) {
    const body = r.json();
    if (body.clickhouse !== 'ok') clickhouseDown.add(1);
    if (body.buffer === 'full') bufferFull.add(1);
  }
  sleep(1);
}

/**
 * A scenario starting `rate` iterations per second for `duration`, with VUS (or `vus`) VUs made
 * ready and up to `growth` times as many when answers slow down.
 */
export function arrivalRate(rate, duration, vus, growth) {
  const ready = Number(__ENV.VUS || vus);
  return {
    executor: 'constant-arrival-rate',
    rate,
    timeUnit: '1s',
    duration,
    preAllocatedVUs: ready,
    maxVUs: ready * growth,
  };
}

/** The threshold that the load generator kept up: at most 1 % of the planned iterations dropped. */
export function keptUp(rate, duration) {
  return [`count<${Math.ceil(rate * 0.01 * durationSeconds(duration))}`];
}

/** p95 and p99 thresholds (P95_MS, P99_MS: 50 and 100 ms) on each kind of request of an ad view. */
export function viewLatency() {
  const p95 = Number(__ENV.P95_MS || 50);
  const p99 = Number(__ENV.P99_MS || 100);
  const latency = {};
  for (const ep of ['pixel', 'impression', 'batch', 'click']) {
    latency[`http_req_duration{ep:${ep}}`] = [`p(95)<${p95}`, `p(99)<${p99}`];
  }
  return latency;
}

/** A scenario running monitor() next to the load for `duration`. */
export function monitorScenario(duration) {
  return { executor: 'constant-vus', vus: 1, duration, exec: 'monitor', gracefulStop: '2s' };
}

// ------------------------------------------------------------------ setup and teardown
function adminHeaders() {
  const h = { 'Content-Type': 'application/json' };
  if (__ENV.ADMIN_KEY) h.Authorization = `Bearer ${__ENV.ADMIN_KEY}`;
  return h;
}

/**
 * The run's tag and ads: the active ones (GET /ads, at most 100) plus `count` new ones created
 * through POST /ads. Fails the run at once when adbeacon does not answer.
 */
export function setupRun(count) {
  const tag = (__ENV.RUN_TAG || hex(Math.floor(Math.random() * 0xffffffff), 8)).toLowerCase();
  if (!/^[0-9a-f]{8}$/.test(tag)) exec.test.abort(`RUN_TAG must be 8 hex digits, got ${tag}`);
  const ready = http.get(`${BASE_URL}/readyz`, { tags: { name: 'setup' } });
  if (ready.status !== 200) exec.test.abort(`${BASE_URL}/readyz answered ${ready.status}: ${ready.body}`);
  const active = http.get(`${BASE_URL}/ads`, { tags: { name: 'setup' } });
  if (active.status !== 200) exec.test.abort(`GET /ads answered ${active.status}`);
  const ads = active.json().slice(0, 100).map((a) => a.id);
  const created = [];
  const n = __ENV.ADS !== undefined ? Number(__ENV.ADS) : count;
  for (let i = 0; i < n; i++) {
    const res = http.post(
      `${BASE_URL}/ads`,
      JSON.stringify({
        name: `k6 ${tag} #${i + 1}`,
        video_url: `/videos/k6-${tag}-${i + 1}.mp4`,
        target_url: `https://www.example.com/k6/${tag}/${i + 1}`,
      }),
      { headers: adminHeaders(), tags: { name: 'setup' } },
    );
    if (res.status !== 201) exec.test.abort(`POST /ads answered ${res.status}: ${res.body}`);
    created.push(res.json().id);
  }
  const all = ads.concat(created);
  if (created.length === 0) {
    exec.test.abort("ADS=0: the books find a run's pixels and old-style clicks by the ads it creates; ADS must be at least 1");
  }
  console.log(`run ${tag}: ${all.length} ads (${created.length} created), ${CLIENTS} client addresses, ${BASE_URL}`);
  return { tag, ads: all, created, started: Date.now() };
}

function k6Count(metric) {
  const res = http.get(`${K6_API}/v1/metrics/${metric}`, {
    tags: { name: 'teardown' },
    responseCallback: http.expectedStatuses(200, 404),
  });
  if (res.status === 404) return 0; // never sampled
  if (res.status !== 200) {
    exec.test.abort(`k6's REST API (${K6_API}, see K6_API) answered ${res.status}; run k6 with --address matching K6_API`);
  }
  return res.json().data.attributes.sample.count;
}

/** Sum of the /metrics series whose name (with labels) matches `re`; null when none. */
function metric(text, re) {
  let sum = null;
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const sp = line.lastIndexOf(' ');
    if (sp > 0 && re.test(line.slice(0, sp))) sum = (sum || 0) + Number(line.slice(sp + 1));
  }
  return sum;
}

function clickhouse(sql) {
  const h = {};
  if (__ENV.CLICKHOUSE_USER || __ENV.CLICKHOUSE_PASSWORD) {
    h.Authorization = `Basic ${encoding.b64encode(`${__ENV.CLICKHOUSE_USER || 'default'}:${__ENV.CLICKHOUSE_PASSWORD || ''}`)}`;
  }
  const res = http.post(`${CLICKHOUSE_URL}/?database=${CLICKHOUSE_DATABASE}`, sql, {
    headers: h,
    tags: { name: 'teardown' },
    timeout: '60s',
  });
  if (res.status !== 200) exec.test.abort(`ClickHouse (${CLICKHOUSE_URL}) answered ${res.status}: ${res.body}`);
  return res.body.trim();
}

/**
 * The books, at the end of the run: waits until adbeacon holds nothing (its buffer is empty,
 * `adbeacon_books_balance` reads 0 and its Redis spill, if any, is drained), then finds the
 * run's events in ClickHouse (by the run's tag in their ids; by the run's own ads for a script
 * sending no ids, data.idless) and compares them with what k6 saw answered: their number, the
 * sum of their keys (eventKey: id, kind and ad), rows per event, and the run's ads' aggregates
 * against a recount of their rows. Records events_stored, events_lost, events_stored_twice,
 * events_stored_unacked, events_keys_off, aggregates_off and books_off, which the thresholds
 * check.
 */
export function checkStored(data) {
  const t0 = Date.now();
  loadSeconds.add((t0 - data.started) / 1000);
  // k6's counters reach its REST API a moment after the requests: read until they settle.
  let acked = -1;
  let refused = -1;
  let uncertain = -1;
  let ackedKeys = -1;
  for (;;) {
    sleep(0.5);
    const a = k6Count('events_acked');
    const r = k6Count('events_refused');
    const u = k6Count('events_uncertain');
    const k = k6Count('events_acked_keys');
    if (a === acked && r === refused && u === uncertain && k === ackedKeys) break;
    [acked, refused, uncertain, ackedKeys] = [a, r, u, k];
  }
  const sent = k6Count('events_sent');

  // adbeacon holds nothing once ClickHouse confirmed every batch (FLUSH_INTERVAL, retries), and
  // what went to a Redis spill is in ClickHouse once the spill is empty.
  let held = null;
  let balance = null;
  let backlog = null;
  let text = '';
  while (Date.now() - t0 < FLUSH_WAIT * 1000) {
    const res = http.get(`${BASE_URL}/metrics`, { tags: { name: 'teardown' } });
    if (res.status === 200) {
      text = res.body;
      held = metric(text, /^adbeacon_buffer_events$/);
      balance = metric(text, /^adbeacon_books_balance$/);
      backlog = metric(text, /^adbeacon_spill_backlog_events$/) || 0;
      if (held === 0 && balance === 0 && backlog === 0) break;
    }
    sleep(0.5);
  }
  booksOff.add(Math.abs(balance === null ? 1 : balance) + Math.abs(held === null ? 1 : held) + (backlog || 0));

  const created = data.created.map((a) => `'${a}'`).join(',');
  // The run's events: by their ids, and on the run's own ads (pixels, whose ids adbeacon makes).
  const where = data.idless
    ? `ad_id IN (${created})`
    : `(substring(toString(event_id), 1, 8) = '${data.tag}' OR ad_id IN (${created}))`;
  // Without ids a row cannot be told from its twin: rows stand for events (a second copy shows
  // as stored unacknowledged).
  const distinctSql = data.idless ? 'count()' : 'uniqExact(event_id)';
  const row = clickhouse(
    `SELECT count(), ${distinctSql}, countIf(traffic = 'valid'), countIf(traffic = 'duplicate'),` +
      ` countIf(traffic = 'bot'), countIf(traffic = 'empty_user_agent') FROM events WHERE ${where} FORMAT TSV`,
  )
    .split('\t')
    .map(Number);
  const [rows, distinct, valid, duplicate, bot, emptyAgent] = row;
  const lost = Math.max(0, acked - distinct);
  // Stored but not acknowledged: only events whose answer never came may be (a 503 stores nothing).
  const unexplained = Math.max(0, distinct - acked - uncertain);
  // The keys identify the events only when every one was answered: an unanswered one may or may
  // not be stored (and fails the run anyway, as an unexpected status).
  const storedKeys = Number(clickhouse(keysSql(data, where)) || 0);
  const keysDiffer = uncertain === 0 && storedKeys !== ackedKeys;
  eventsStored.add(distinct);
  eventsLost.add(lost);
  eventsStoredTwice.add(rows - distinct);
  eventsUnexplained.add(unexplained);
  keysOff.add(keysDiffer ? 1 : 0);

  // The run's own ads hold only its events: their aggregates (what analytics reads) must equal a
  // recount of their valid rows, per ad and kind, unique clickers included.
  let aggregates = 'no ads created';
  if (data.created.length > 0) {
    const kinds = ['impression', 'click', 'start', 'first_quartile', 'midpoint', 'third_quartile', 'complete'];
    const columns = ['impressions', 'clicks', 'starts', 'first_quartiles', 'midpoints', 'third_quartiles', 'completes'];
    const raw = clickhouse(
      `SELECT toString(ad_id) AS ad, ${kinds.map((k) => `countIf(kind = '${k}')`).join(', ')},` +
        ` uniqExactIf(ip_hash, kind = 'click') FROM events WHERE ad_id IN (${created}) AND traffic = 'valid'` +
        ' GROUP BY ad ORDER BY ad FORMAT TSV',
    );
    const merged = (table) =>
      clickhouse(
        `SELECT toString(ad_id) AS ad, ${columns.map((c) => `countIfMerge(${c})`).join(', ')},` +
          ` uniqIfMerge(unique_clicks) FROM ${table} WHERE ad_id IN (${created}) GROUP BY ad ORDER BY ad FORMAT TSV`,
      );
    // ad_counts (what one ad's answer reads): counts[1 + kind], kind's Enum8 number in `events`.
    const positions = [2, 3, 5, 6, 7, 8, 9];
    const counted = (grain) =>
      clickhouse(
        `SELECT ad, ${positions.map((p) => `c[${p}]`).join(', ')}, u FROM (SELECT toString(ad_id) AS ad,` +
          ` sumForEachMerge(counts) AS c, uniqIfMerge(unique_clicks) AS u FROM ad_counts` +
          ` WHERE ad_id IN (${created}) AND grain = '${grain}' GROUP BY ad) ORDER BY ad FORMAT TSV`,
      );
    const differing = ['ad_stats_hourly', 'ad_stats_minutely'].filter((t) => merged(t) !== raw);
    differing.push(...['hour', 'minute'].filter((g) => counted(g) !== raw).map((g) => `ad_counts (${g} rows)`));
    aggregatesOff.add(differing.length);
    aggregates = differing.length
      ? `${differing.join(' and ')} differ from the recount`
      : 'hourly and minute tables and ad_counts equal the recount';
  }

  const accepted = metric(text, /^adbeacon_events_accepted_total/);
  const flushed = metric(text, /^adbeacon_events_flushed_total$/);
  const secs = (Date.now() - data.started) / 1000;
  const verdict =
    lost === 0 && rows === distinct && unexplained === 0 && !keysDiffer && balance === 0 && held === 0 && !backlog;
  console.log(
    [
      `run ${data.tag} books (${((Date.now() - t0) / 1000).toFixed(1)} s after the load, ${secs.toFixed(0)} s since setup):`,
      `  k6: ${sent} events sent, ${acked} acknowledged (2xx), ${refused} refused (503), ${uncertain} unanswered`,
      `  ClickHouse: ${distinct} of them stored (${rows} rows): valid ${valid}, duplicate ${duplicate}, bot ${bot}, empty user agent ${emptyAgent}`,
      `  keys (id, kind, ad): acknowledged ${ackedKeys}, stored ${storedKeys}${uncertain ? ' (not compared: unanswered events)' : ''}`,
      `  aggregates of the run's ${data.created.length} ads: ${aggregates}`,
      `  adbeacon: accepted ${accepted} (its lifetime), flushed ${flushed}, held ${held}, books balance ${balance}, spill backlog ${backlog}`,
      `  ${verdict ? 'OK: stored = acknowledged' : 'FAILED'}: lost ${lost}, stored twice ${rows - distinct}, stored unacknowledged ${unexplained}${keysDiffer ? ', keys differ' : ''}`,
    ].join('\n'),
  );
}

/** Retires the ads setupRun created (DELETE /ads/{id}: their events and analytics stay). */
export function retireAds(data) {
  if (__ENV.KEEP_ADS === '1') return;
  for (const id of data.created) {
    http.del(`${BASE_URL}/ads/${id}`, null, { headers: adminHeaders(), tags: { name: 'teardown' } });
  }
}

export function teardownRun(data) {
  checkStored(data);
  retireAds(data);
}

/** Seconds in a k6 duration such as 30s, 5m, 1h or 1m30s. */
export function durationSeconds(d) {
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h)/g;
  let total = 0;
  let seen = '';
  let m;
  while ((m = re.exec(d)) !== null) {
    total += Number(m[1]) * { ms: 0.001, s: 1, m: 60, h: 3600 }[m[2]];
    seen += m[0];
  }
  if (seen !== d || seen === '') throw new Error(`a duration must look like 30s, 5m, 1h or 1m30s, got ${d}`);
  return total;
}

/** Options every script shares. */
export const COMMON_OPTIONS = {
  summaryTrendStats: SUMMARY_TREND_STATS,
  // The books wait for adbeacon to store what it holds (outage: ClickHouse comes back first).
  teardownTimeout: `${FLUSH_WAIT + 60}s`,
  setupTimeout: '120s',
};
