-- wrk script for adbeacon's hot path: POST /ads/click with the old service's JSON body.
--
--   wrk --latency -t1 -c64 -d15s -s loadtest/wrk/click.lua http://127.0.0.1:8080
--
-- Requests cycle through the three demo ads and a spread of playback positions. Pacing
-- (WRK_DELAY_MS) and the RESULT line: see common.lua.

local common = dofile("loadtest/wrk/common.lua")

local playback_times = { 0, 3, 7.5, 15, 30, 42.25, 60, 90, 119.9 }

common.install(function()
  local headers = { ["Content-Type"] = "application/json", ["User-Agent"] = common.user_agent }
  local requests = {}
  for _, ad in ipairs(common.ads) do
    for _, t in ipairs(playback_times) do
      local body = string.format(
        '{"adId":"%s","timestamp":"%s","ipAddress":"192.168.1.1","videoPlaybackTime":%s}',
        ad, common.timestamp, tostring(t))
      requests[#requests + 1] = wrk.format("POST", "/ads/click", headers, body)
    end
  end
  return requests
end)
