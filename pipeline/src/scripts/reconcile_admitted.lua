-- Corrects the admission counter from the true count of images in flight
-- downstream of rate-check: every entry pending in or not yet delivered to
-- a downstream stage's group, and every event in a downstream retry set.
-- Each of those took a slot when it was dispatched and frees it when it
-- ends, in the same script, so in one atomic look the two must agree; a
-- difference is drift (a path that lost or doubled a release) and is
-- repaired here. Replayed dead letters bypass the window and are counted
-- while they are in flight: they occupy downstream capacity all the same.
-- KEYS: admitted counter, then per downstream stage: its stream, its
--       retry set
-- ARGV: per downstream stage: its group
-- Returns {in flight, counter before}, or {-1, counter} when a stream's
-- undelivered count cannot be known cheaply (nothing is changed then).
local counted = 0
for s = 1, #ARGV do
  local stream, retries, group = KEYS[2 * s], KEYS[2 * s + 1], ARGV[s]
  if redis.call('EXISTS', stream) == 1 then
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
      local fields = {}
      for j = 1, #g, 2 do fields[g[j]] = g[j + 1] end
      if fields['name'] == group then
        local lag = fields['lag']
        if not lag or tonumber(lag) > redis.call('XLEN', stream) then
          -- Redis 7.0 cannot tell the lag after deletions, and a promoted
          -- replica may report one larger than the stream (its group's
          -- read counter is not replicated exactly): count it.
          local waiting = redis.call('XRANGE', stream, '(' .. fields['last-delivered-id'], '+', 'COUNT', 100001)
          if #waiting > 100000 then return {-1, tonumber(redis.call('GET', KEYS[1]) or '0')} end
          lag = #waiting
        end
        counted = counted + tonumber(fields['pending']) + tonumber(lag)
      end
    end
  end
  counted = counted + redis.call('ZCARD', retries)
end
local before = tonumber(redis.call('GET', KEYS[1]) or '0')
if before ~= counted then redis.call('SET', KEYS[1], counted) end
return {counted, before}
