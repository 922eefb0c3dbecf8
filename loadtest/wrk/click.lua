-- wrk script for adbeacon's hot path: POST /ads/click with the old service's JSON body.
--
--   wrk --latency -t1 -c64 -d15s -s loadtest/wrk/click.lua http://127.0.0.1:8080
--
-- Requests cycle through the three demo ads (seeded at start-up, so every click is a 202) and a
-- spread of playback positions. They are formatted once per thread, so the Lua side costs wrk
-- almost nothing per request. The timestamp is taken once at start-up: a run lasts seconds, far
-- inside MAX_CLOCK_SKEW / MAX_EVENT_AGE, so the service keeps the client time.
--
-- WRK_DELAY_MS=N (environment) paces the load: each connection waits N ms after an answer before
-- its next request, so C connections offer about C * 1000 / (N + latency in ms) requests per
-- second (scripts/bench-modes.sh uses it for the runs at half of saturation).
--
-- done() prints one machine-readable line for scripts/bench.sh:
--   RESULT rps=… p50_us=… p99_us=… requests=… non2xx=… errors=…
-- non2xx is wrk's errors.status (responses with status >= 400); errors sums the socket errors
-- (connect, read, write, timeout).

local ads = {
  "11111111-1111-1111-1111-111111111111",
  "22222222-2222-2222-2222-222222222222",
  "33333333-3333-3333-3333-333333333333",
}
local playback_times = { 0, 3, 7.5, 15, 30, 42.25, 60, 90, 119.9 }

-- os.date("!…") is UTC, so a trailing Z is correct RFC 3339.
local timestamp = os.date("!%Y-%m-%dT%H:%M:%SZ")

local requests = {}
local next_index = 1

local thread_count = 0

-- Runs in the main Lua state once per thread, before the threads start.
function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_id", thread_count)
end

-- Runs in each thread's own Lua state.
function init(args)
  -- A player's user agent: without one every click would be stored as invalid traffic and skip
  -- the repeat rule, which is part of the path being measured.
  local headers = {
    ["Content-Type"] = "application/json",
    ["User-Agent"] = "Mozilla/5.0 (SMART-TV; Linux; Tizen 7.0) AppleWebKit/537.36 (KHTML, like Gecko) Version/7.0 TV Safari/537.36",
  }
  for _, ad in ipairs(ads) do
    for _, t in ipairs(playback_times) do
      local body = string.format(
        '{"adId":"%s","timestamp":"%s","ipAddress":"192.168.1.1","videoPlaybackTime":%s}',
        ad, timestamp, tostring(t))
      requests[#requests + 1] = wrk.format("POST", "/ads/click", headers, body)
    end
  end
  -- Threads start at different places in the cycle, so they don't send the same sequence.
  next_index = ((thread_id or 1) - 1) * 7 % #requests + 1
end

local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "")
if delay_ms then
  -- Defined only when asked for: wrk calls it before every request.
  function delay()
    return delay_ms
  end
end

function request()
  local r = requests[next_index]
  next_index = next_index % #requests + 1
  return r
end

function done(summary, latency, _requests)
  local e = summary.errors
  local seconds = summary.duration / 1e6
  local rps = 0
  if seconds > 0 then
    rps = summary.requests / seconds
  end
  io.write(string.format(
    "RESULT rps=%.1f p50_us=%d p99_us=%d requests=%d non2xx=%d errors=%d"
      .. " connect=%d read=%d write=%d timeout=%d\n",
    rps, latency:percentile(50), latency:percentile(99), summary.requests, e.status,
    e.connect + e.read + e.write + e.timeout, e.connect, e.read, e.write, e.timeout))
end
