-- Moves waiting images downstream, vendor by vendor in weighted
-- round-robin, only while fewer than `window` images are in flight
-- downstream. Safe with any number of dispatchers: each call is atomic.
-- A round gives each waiting vendor its weight in images; when the free
-- window holds several rounds they are taken at once (one LPOP per vendor
-- for all of them), and a round cut short by the window resumes, next
-- call, with the vendors it did not reach.
-- Only the head of the ring is read: every vendor reached takes at least
-- one image, so a call reaches at most as many vendors as the free window
-- holds, whatever the number of vendors waiting (the ring may hold
-- hundreds of thousands; nothing here unpacks it whole).
-- A vendor whose turn the window cut in the middle (it took 2 of its 4)
-- is first next call and takes the rest of its turn then (the round
-- state), so weights hold exactly however small the window.
-- Keys of vendor queues and streams are derived from prefixes passed in;
-- they share the hash tag of the declared keys.
-- KEYS: vendor ring, admitted counter, vendor weights, round state
-- ARGV: window, vendor queue prefix, stream prefix, now ms, progress channel
-- Returns {dispatched, vendors still waiting}.
local ring = KEYS[1]
local budget = tonumber(ARGV[1]) - tonumber(redis.call('GET', KEYS[2]) or '0')
if budget <= 0 then return {0, redis.call('LLEN', ring)} end
local len = redis.call('LLEN', ring)
if len == 0 then return {0, 0} end
local head = math.min(len, budget)
local whole = head == len
local vendors = redis.call('LRANGE', ring, 0, head - 1)
-- Weights in slices, for the same reason.
local weights = {}
for s = 1, #vendors, 500 do
  local slice = {}
  for k = s, math.min(s + 499, #vendors) do slice[#slice + 1] = vendors[k] end
  local w = redis.call('HMGET', KEYS[3], unpack(slice))
  for k = 1, #slice do weights[s + k - 1] = w[k] end
end
local active = {}
for k, v in ipairs(vendors) do
  active[k] = {name = v, weight = math.max(1, tonumber(weights[k] or '1') or 1)}
end
-- The rest of a turn the last call cut short, if its vendor is first.
local owed_to, owed = nil, 0
local state = redis.call('GET', KEYS[4])
if state then
  local v, n = string.match(state, '^(.*)\n(%d+)$')
  if v == vendors[1] then owed_to, owed = v, tonumber(n) end
end
local resume = nil
local first_pass = true
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
      local turn = v.weight * rounds
      if first_pass and v.name == owed_to then turn = owed end
      local want = math.min(turn, budget)
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
      if n < want then
        emptied[v.name] = true
      else
        still[#still + 1] = v
        if want < turn then
          -- The window filled in the middle of this vendor's turn: it
          -- goes first next call, for the rest of it.
          cut = cut or v.name
          resume = v.name .. '\n' .. (turn - n)
        end
      end
    end
  end
  first_pass = false
  active = still
  -- Past the head, other vendors come before a second round for these.
  if not whole then break end
end
if resume then
  redis.call('SET', KEYS[4], resume)
elseif state and moved > 0 then
  redis.call('DEL', KEYS[4])
end
if moved > 0 then
  redis.call('INCRBY', KEYS[2], moved)
  redis.call('PUBLISH', ARGV[5], '[' .. table.concat(announced, ',') .. ']')
end
local function push(cmd, list, from, to, step)
  local slice = {}
  for k = from, to, step do
    slice[#slice + 1] = list[k]
    if #slice == 500 then redis.call(cmd, ring, unpack(slice)); slice = {} end
  end
  if #slice > 0 then redis.call(cmd, ring, unpack(slice)) end
end
-- Rewrite the head of the ring if a vendor's queue emptied, a round was
-- cut short or vendors lie past the head: those not reached first, then
-- the vendors past the head, then the ones reached; emptied ones go.
if cut or next(emptied) or not whole then
  local first, after = {}, {}
  local reached = true
  for _, v in ipairs(vendors) do
    if v == cut then reached = false end
    if not emptied[v] then
      if reached then after[#after + 1] = v else first[#first + 1] = v end
    end
  end
  if whole then
    redis.call('DEL', ring)
    push('RPUSH', first, 1, #first, 1)
  else
    redis.call('LTRIM', ring, head, -1)
    push('LPUSH', first, #first, 1, -1)
  end
  push('RPUSH', after, 1, #after, 1)
  return {moved, redis.call('LLEN', ring)}
end
return {moved, len}
