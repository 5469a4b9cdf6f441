-- Moves waiting images downstream, vendor by vendor in weighted
-- round-robin, only while fewer than `window` images are in flight
-- downstream. Safe with any number of dispatchers: each call is atomic.
-- Keys of vendor queues and streams are derived from prefixes passed in;
-- they share the hash tag of the declared keys.
-- KEYS: vendor ring, admitted counter, vendor weights
-- ARGV: window, vendor queue prefix, stream prefix, now ms, progress channel
-- Returns {dispatched, vendors still waiting}.
local budget = tonumber(ARGV[1]) - tonumber(redis.call('GET', KEYS[2]) or '0')
local moved = 0
while budget > 0 do
  local vendor = redis.call('LMOVE', KEYS[1], KEYS[1], 'LEFT', 'RIGHT')
  if not vendor then break end
  local queue = ARGV[2] .. vendor
  local weight = tonumber(redis.call('HGET', KEYS[3], vendor) or '1')
  local items = redis.call('LPOP', queue, math.min(weight, budget))
  if not items then
    redis.call('LREM', KEYS[1], 0, vendor)
  else
    for _, item in ipairs(items) do
      local stage, job, id, i, payload =
        string.match(item, '^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$')
      redis.call('XADD', ARGV[3] .. stage, '*', 'e', payload)
      redis.call('HSET', job, i .. ':stage', stage, i .. ':status', 'processing',
        'status', 'processing', 'updated_ms', ARGV[4])
      progress(ARGV[5], id, i, stage, 'processing')
    end
    moved = moved + #items
    budget = budget - #items
    if redis.call('LLEN', queue) == 0 then redis.call('LREM', KEYS[1], 0, vendor) end
  end
end
if moved > 0 then redis.call('INCRBY', KEYS[2], moved) end
return {moved, redis.call('LLEN', KEYS[1])}
