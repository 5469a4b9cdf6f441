-- Trims a stream's acknowledged entries and nothing else. Redis 7.0 has no
-- trim by acknowledgement, so the floor is the lowest of, for every group,
-- its oldest pending entry and its first undelivered one; XTRIM MINID keeps
-- everything at or above the floor.
-- KEYS: stream
-- Returns the number of entries removed.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function lower(a, b)
  if a == nil then return b end
  local am, as = parse(a)
  local bm, bs = parse(b)
  if bm < am or (bm == am and bs < as) then return b end
  return a
end
local floor = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last
  for j = 1, #g, 2 do
    if g[j] == 'name' then name = g[j + 1] elseif g[j] == 'last-delivered-id' then last = g[j + 1] end
  end
  local ms, seq = parse(last)
  floor = lower(floor, ms .. '-' .. (seq + 1))
  local summary = redis.call('XPENDING', KEYS[1], name)
  if tonumber(summary[1]) > 0 then floor = lower(floor, summary[2]) end
end
if floor == nil then return 0 end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
