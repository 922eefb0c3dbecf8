-- What loadtest/wrk/click.lua, pixel.lua and batch.lua share: the demo ads, a player's user
-- agent, the start-up timestamp, the WRK_DELAY_MS pacing and the RESULT line that
-- scripts/lib/bench-common.sh reads. Loaded with dofile() relative to the repository root, where
-- the bench scripts run wrk.
--
-- Each script builds its requests once per thread (common.cycle), so the Lua side costs wrk almost
-- nothing per request. The timestamp is taken once at start-up: a run lasts seconds, far inside
-- MAX_CLOCK_SKEW / MAX_EVENT_AGE, so the service keeps the client time.
--
-- WRK_DELAY_MS=N (environment) paces the load: each connection waits N ms after an answer before
-- its next request, so C connections offer about C * 1000 / (N + latency in ms) requests per
-- second (the runs at half of saturation use it).
--
-- WRK_EVENT_IDS=1 (environment) gives every event a fresh client event id (`eid`, `eventId`), as
-- players and SDKs send them: the service then also claims and remembers each id. The scripts
-- build their requests once with common.event_id() marks; request() fills in one formatted prefix
-- per request, so the ids cost wrk little.
--
-- done() prints one machine-readable line:
--   RESULT rps=… p50_us=… p99_us=… requests=… non2xx=… errors=…
-- non2xx is wrk's errors.status (responses with status >= 400); errors sums the socket errors
-- (connect, read, write, timeout).

local common = {}

-- Seeded at start-up (SEED_DEMO_ADS), so every event is for a known ad.
common.ads = {
  "11111111-1111-1111-1111-111111111111",
  "22222222-2222-2222-2222-222222222222",
  "33333333-3333-3333-3333-333333333333",
}

-- A player's user agent: without one every event would be stored as invalid traffic and skip the
-- repeat rule, which is part of the path being measured.
common.user_agent = "Mozilla/5.0 (SMART-TV; Linux; Tizen 7.0) AppleWebKit/537.36 (KHTML, like Gecko) Version/7.0 TV Safari/537.36"

-- os.date("!…") is UTC, so a trailing Z is correct RFC 3339.
common.timestamp = os.date("!%Y-%m-%dT%H:%M:%SZ")

common.event_ids = os.getenv("WRK_EVENT_IDS") == "1"
-- Where a request's id prefix goes: as long as the prefix (`%08x-%04x`, a counter and the thread),
-- so that the Content-Length wrk.format computed stays right. No request holds these bytes.
local ID = string.rep("\1", 13)
-- The start-up second in the id's middle groups: each run sends new ids (the service remembers
-- ids for an hour, and the bench runs one script several times against the same instance).
local run = os.time() % 16777216
local middle = string.format("-4%03x-8%03x-", math.floor(run / 4096), run % 4096)

-- A fresh UUID per request: `n` (0 to 2^48-1) tells the ids of one request apart.
function common.event_id(n)
  return ID .. middle .. string.format("%012x", n)
end

local thread_count = 0

-- Splits each request at the id marks: a list of parts, the slots for the prefix at even places.
local function templates(requests)
  local out = {}
  for i, r in ipairs(requests) do
    local parts, at = {}, 1
    while true do
      local s, e = string.find(r, ID, at, true)
      if not s then break end
      parts[#parts + 1] = string.sub(r, at, s - 1)
      parts[#parts + 1] = ""
      at = e + 1
    end
    parts[#parts + 1] = string.sub(r, at)
    out[i] = parts
  end
  return out
end

-- Installs setup/init/request/delay/done in the calling script's globals. build() runs in each
-- thread's own Lua state and returns that thread's list of formatted requests.
function common.install(build)
  local requests, next_index = {}, 1

  -- Runs in the main Lua state once per thread, before the threads start.
  function setup(thread)
    thread_count = thread_count + 1
    thread:set("thread_id", thread_count)
  end

  function init(_args)
    requests = build()
    -- Threads start at different places in the cycle, so they don't send the same sequence.
    next_index = ((thread_id or 1) - 1) * 7 % #requests + 1
  end

  function request()
    local r = requests[next_index]
    next_index = next_index % #requests + 1
    return r
  end

  if common.event_ids then
    local parts, sent = nil, 0
    function request()
      if not parts then parts = templates(requests) end
      local p = parts[next_index]
      next_index = next_index % #parts + 1
      sent = sent + 1
      local prefix = string.format("%08x-%04x", sent % 0x100000000, (thread_id or 1) % 0x10000)
      for i = 2, #p - 1, 2 do
        p[i] = prefix
      end
      return table.concat(p)
    end
  end

  local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "")
  if delay_ms then
    -- Defined only when asked for: wrk calls it before every request.
    function delay()
      return delay_ms
    end
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
end

return common
