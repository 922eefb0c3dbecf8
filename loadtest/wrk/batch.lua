-- wrk script for the SDK batch endpoint: POST /ads/events with WRK_BATCH_EVENTS (100) events each.
--
--   WRK_BATCH_EVENTS=100 wrk --latency -t1 -c64 -d15s -s loadtest/wrk/batch.lua http://127.0.0.1:8080
--
-- Each body holds whole views (impression, start, quartiles, complete; now and then a click) over
-- the three demo ads. No eventId: every item is a new event (a repeated id would be answered as a
-- duplicate and stored once, which would flatter the figure). With WRK_EVENT_IDS=1 every item
-- carries a fresh UUID as its eventId, as an SDK sends them. Events per second = requests per
-- second times WRK_BATCH_EVENTS. Pacing (WRK_DELAY_MS), the ids and the RESULT line: see common.lua.

local common = dofile("loadtest/wrk/common.lua")

local per_request = tonumber(os.getenv("WRK_BATCH_EVENTS") or "") or 100
local view = {
  { "impression", nil }, { "start", 0 }, { "firstQuartile", 7.5 }, { "midpoint", 15 },
  { "thirdQuartile", 22.5 }, { "complete", 30 },
}

common.install(function()
  local headers = { ["Content-Type"] = "application/json", ["User-Agent"] = common.user_agent }
  local requests = {}
  local n = 0
  -- A few distinct bodies, each starting at another point of the cycle.
  for variant = 1, 7 do
    local items = {}
    for i = 1, per_request do
      n = n + variant
      local ad = common.ads[n % #common.ads + 1]
      local kind, pt = view[n % #view + 1][1], view[n % #view + 1][2]
      if n % 50 == 0 then
        kind, pt = "click", 12.5
      end
      local item = string.format('{"adId":"%s","kind":"%s","timestamp":"%s"', ad, kind, common.timestamp)
      if pt then
        item = item .. ',"playbackTime":' .. tostring(pt)
      end
      if common.event_ids then
        item = item .. ',"eventId":"' .. common.event_id(i) .. '"'
      end
      items[i] = item .. "}"
    end
    requests[#requests + 1] = wrk.format("POST", "/ads/events", headers, "[" .. table.concat(items, ",") .. "]")
  end
  return requests
end)
