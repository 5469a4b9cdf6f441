-- Moves waiting images downstream, vendor by vendor in weighted
-- round-robin, only while fewer than `window` images are in flight
-- downstream. Safe with any number of dispatchers: each call is atomic.
-- A round gives each waiting vendor its weight in images; when the free
-- window holds several rounds they are taken at once, and a round cut
-- short by the window resumes, next call, with the vendors it did not
-- reach.
-- Only the head of the ring is read: every vendor reached takes at least
-- one image, so a call reaches at most as many vendors as the free window
-- holds, whatever the number of vendors waiting (the ring may hold
-- hundreds of thousands; nothing here unpacks it whole).
-- A vendor whose turn the window cut in the middle (it took 2 of its 4)
-- is first next call and takes the rest of its turn then (the round
-- state), so weights hold exactly however small the window.
--
-- Every key is declared (a cluster needs that, and a slot migration must
-- never find a script half-way through its writes), so a dispatch is
-- three calls, made by admission/mod.rs:
--   'plan': with the head of the ring as the caller read it and those
--           vendors' queues, returns how many images each vendor gives
--           and the jobs they belong to; writes nothing.
--   'commit': the same plan again, checked to be the one the caller was
--           given, every item's job and stream checked to be declared,
--           and only then any write.
--   The commit may find more room or longer queues than the plan did
--   (images finished, others parked): it keeps to the plan's budget and
--   queue lengths, so it takes the items the caller read. It may take
--   fewer (another dispatcher took some first).
-- Either returns {-1, vendors waiting} when the ring's head changed since
-- the caller read it, or an item's job was not declared: read again.
-- KEYS: vendor ring, admitted counter, vendor weights, round state, then
--       the queue of each head vendor (in ARGV's order), then the stream
--       of each stage named in ARGV, then (commit) every item's job
-- ARGV: mode, window, now ms, progress channel, head vendor count h, the
--       h head vendors, stage count s, the s stage names, then (commit)
--       the plan's budget and its h queue lengths
-- Returns, for a plan: {0, vendors waiting, budget, then per head vendor
-- its queue's length, the n images it gives and their n job ids}; for a
-- commit: {images moved, vendors waiting}.
local ring = KEYS[1]
local mode, window, now, channel = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local h = tonumber(ARGV[5])
local declared_vendors, queue_of = {}, {}
for k = 1, h do
  declared_vendors[k] = ARGV[5 + k]
  queue_of[ARGV[5 + k]] = KEYS[4 + k]
end
local s = tonumber(ARGV[6 + h])
local stream_of = {}
for k = 1, s do stream_of[ARGV[6 + h + k]] = KEYS[4 + h + k] end
local committing = mode == 'commit'
local budget = window - tonumber(redis.call('GET', KEYS[2]) or '0')
local planned_len = {}
local declared_jobs = {}
if committing then
  budget = math.min(budget, tonumber(ARGV[7 + h + s]))
  for k = 1, h do planned_len[declared_vendors[k]] = tonumber(ARGV[7 + h + s + k]) end
  for k = 5 + h + s, #KEYS do declared_jobs[KEYS[k]] = true end
end
local len = redis.call('LLEN', ring)
if budget <= 0 or len == 0 then return {0, len} end
local planned_budget = budget
local head = math.min(len, budget, h)
local whole = head == len
local vendors = redis.call('LRANGE', ring, 0, head - 1)
for k = 1, head do
  if vendors[k] ~= declared_vendors[k] then return {-1, len} end
end
-- Weights in slices: unpack() of many vendors would pass Lua's limit on
-- a call's arguments.
local weights = {}
for from = 1, #vendors, 500 do
  local slice = {}
  for k = from, math.min(from + 499, #vendors) do slice[#slice + 1] = vendors[k] end
  local w = redis.call('HMGET', KEYS[3], unpack(slice))
  for k = 1, #slice do weights[from + k - 1] = w[k] end
end
local active = {}
for k, v in ipairs(vendors) do
  active[k] = {name = v, weight = math.max(1, tonumber(weights[k] or '1') or 1)}
end
local left = {}
local queued = {}
for _, v in ipairs(vendors) do
  queued[v] = redis.call('LLEN', queue_of[v])
  left[v] = queued[v]
  if committing then left[v] = math.min(left[v], planned_len[v]) end
end
-- The rest of a turn the last call cut short, if its vendor is first.
local owed_to, owed = nil, 0
local state = redis.call('GET', KEYS[4])
if state then
  local v, n = string.match(state, '^(.*)\n(%d+)$')
  if v == vendors[1] then owed_to, owed = v, tonumber(n) end
end

-- The plan: which vendor gives how many images, in order. No writes.
local takes = {}
local taken = {}
local resume = nil
local first_pass = true
local moved, emptied, cut = 0, {}, nil
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
      local n = math.min(want, left[v.name])
      left[v.name] = left[v.name] - n
      if n > 0 then
        takes[#takes + 1] = {v.name, n}
        taken[v.name] = (taken[v.name] or 0) + n
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

if not committing then
  local out = {0, len, planned_budget}
  for k = 1, head do
    local v = vendors[k]
    local n = taken[v] or 0
    out[#out + 1] = queued[v]
    out[#out + 1] = n
    if n > 0 then
      for _, item in ipairs(redis.call('LRANGE', queue_of[v], 0, n - 1)) do
        out[#out + 1] = string.match(item, '^[^\t]*\t[^\t]*\t([^\t]*)\t') or ''
      end
    end
  end
  return out
end

-- Commit: every key the writes touch must be declared before anything
-- is written.
local items = {}
for v, n in pairs(taken) do
  local list = redis.call('LRANGE', queue_of[v], 0, n - 1)
  if #list ~= n then return {-1, len} end
  local parsed = {}
  for k = 1, n do
    local stage, job, id, i, payload =
      string.match(list[k], '^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$')
    if not (stage and declared_jobs[job] and stream_of[stage]) then return {-1, len} end
    parsed[k] = {stage = stage, job = job, id = id, i = i, payload = payload}
  end
  items[v] = {list = parsed, next = 1}
end

local announced = {}
for _, t in ipairs(takes) do
  local v, n = t[1], t[2]
  local queue = items[v]
  for _ = 1, n do
    local item = queue.list[queue.next]
    queue.next = queue.next + 1
    redis.call('XADD', stream_of[item.stage], '*', 'e', item.payload)
    redis.call('HSET', item.job, item.i .. ':stage', item.stage, item.i .. ':status', IMAGE.processing,
      'status', JOB.processing, 'updated_ms', now)
    announced[#announced + 1] = progress_note(item.id, item.i, item.stage, IMAGE.processing)
  end
end
for v, n in pairs(taken) do redis.call('LTRIM', queue_of[v], n, -1) end
-- A queue that had more than the plan read (images parked since) is not
-- empty, whatever the plan thought.
local gone = {}
for v in pairs(emptied) do
  if queued[v] <= (taken[v] or 0) then gone[v] = true end
end
if resume then
  redis.call('SET', KEYS[4], resume)
elseif state and moved > 0 then
  redis.call('DEL', KEYS[4])
end
if moved > 0 then
  redis.call('INCRBY', KEYS[2], moved)
  redis.call('PUBLISH', channel, '[' .. table.concat(announced, ',') .. ']')
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
if cut or next(gone) or not whole then
  local first, after = {}, {}
  local reached = true
  for _, v in ipairs(vendors) do
    if v == cut then reached = false end
    if not gone[v] then
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
