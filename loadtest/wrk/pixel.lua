-- wrk script for the VAST tracking pixel: GET /t/{event}?ad=…&ts=…&pt=…, as a player fires it.
--
--   wrk --latency -t1 -c64 -d15s -s loadtest/wrk/pixel.lua http://127.0.0.1:8080
--
-- Requests cycle through the three demo ads and the beacons of one view (impression, start, the
-- quartiles, complete). No eid: every beacon is a new event, as a player that fires each URL once
-- makes it; with WRK_EVENT_IDS=1 each beacon carries a fresh UUID as its eid. Pacing
-- (WRK_DELAY_MS), the ids and the RESULT line: see common.lua.

local common = dofile("loadtest/wrk/common.lua")

local beacons = {
  { "impression", nil }, { "start", 0 }, { "firstQuartile", 7.5 }, { "midpoint", 15 },
  { "thirdQuartile", 22.5 }, { "complete", 30 },
}

-- VAST's [ADPLAYHEAD] as a player expands it: HH:MM:SS.mmm.
local function playhead(seconds)
  local h, m = math.floor(seconds / 3600), math.floor(seconds % 3600 / 60)
  return string.format("%02d:%02d:%06.3f", h, m, seconds % 60)
end

common.install(function()
  local headers = { ["User-Agent"] = common.user_agent }
  local ts = common.timestamp:gsub(":", "%%3A")
  local requests = {}
  for _, ad in ipairs(common.ads) do
    for _, b in ipairs(beacons) do
      local path = string.format("/t/%s?ad=%s&ts=%s", b[1], ad, ts)
      if b[2] then
        path = path .. "&pt=" .. playhead(b[2])
      end
      if common.event_ids then
        path = path .. "&eid=" .. common.event_id(0)
      end
      requests[#requests + 1] = wrk.format("GET", path, headers)
    end
  end
  return requests
end)
