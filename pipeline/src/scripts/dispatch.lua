-- Moves waiting images downstream, vendor by vendor in weighted
-- round-robin, only while fewer than `window` images are in flight
-- downstream. Safe with any number of dispatchers: each call is atomic.
-- A round gives each waiting vendor its weight in images; when the free
-- window holds several rounds they are taken at once (one LPOP per vendor
-- for all of them), and a round cut short by the window resumes, next
-- call, with the vendors it did not reach.
-- Keys of vendor queues and streams are derived from prefixes passed in;
-- they share the hash tag of the declared keys.
-- KEYS: vendor ring, admitted counter, vendor weights
-- ARGV: window, vendor queue prefix, stream prefix, now ms, progress channel
-- Returns {dispatched, vendors still waiting}.
local budget = tonumber(ARGV[1]) - tonumber(redis.call('GET', KEYS[2]) or '0')
if budget <= 0 then return {0, redis.call('LLEN', KEYS[1])} end
local vendors = redis.call('LRANGE', KEYS[1], 0, -1)
if #vendors == 0 then return {0, 0} end
local weights = redis.call('HMGET', KEYS[3], unpack(vendors))
local active = {}
for k, v in ipairs(vendors) do
  active[k] = {name = v, weight = math.max(1, tonumber(weights[k] or '1') or 1)}
end
local moved, announced, emptied, cut = 0, {}, {}, nil
while budget > 0 and #active > 0 do
  local total = 0
  for _, v in ipairs(active) do total = total + v.weight end
  local rounds = math.max(1, math.floor(budget / total))
  local still = {}
  for _, v in ipairs(active) do
    if budget <= 0 then
      -- The window filled in the middle of a round: the next call starts
      -- with the vendors this one did not reach.
      cut = cut or v.name
      still[#still + 1] = v
    else
      local want = math.min(v.weight * rounds, budget)
      local items = redis.call('LPOP', ARGV[2] .. v.name, want)
      local n = items and #items or 0
      for k = 1, n do
        local stage, job, id, i, payload =
          string.match(items[k], '^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$')
        redis.call('XADD', ARGV[3] .. stage, '*', 'e', payload)
        redis.call('HSET', job, i .. ':stage', stage, i .. ':status', 'processing',
          'status', 'processing', 'updated_ms', ARGV[4])
        announced[#announced + 1] = '{"job":"' .. id .. '","image":' .. tonumber(i) ..
          ',"stage":"' .. stage .. '","status":"processing"}'
      end
      moved = moved + n
      budget = budget - n
      if n < want then emptied[v.name] = true else still[#still + 1] = v end
    end
  end
  active = still
end
if moved > 0 then
  redis.call('INCRBY', KEYS[2], moved)
  redis.call('PUBLISH', ARGV[5], '[' .. table.concat(announced, ',') .. ']')
end
-- Rewrite the ring if a vendor's queue emptied or a round was cut short:
-- those not reached first, then the rest in their order; emptied ones go.
if cut or next(emptied) then
  local order, first, after = {}, {}, {}
  local reached = true
  for _, v in ipairs(vendors) do
    if v == cut then reached = false end
    if not emptied[v] then
      if reached then after[#after + 1] = v else first[#first + 1] = v end
    end
  end
  for _, v in ipairs(first) do order[#order + 1] = v end
  for _, v in ipairs(after) do order[#order + 1] = v end
  redis.call('DEL', KEYS[1])
  if #order > 0 then redis.call('RPUSH', KEYS[1], unpack(order)) end
  return {moved, #order}
end
return {moved, #vendors}
