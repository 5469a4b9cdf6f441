-- Checks and records one request against several sliding-window limits at
-- once: admitted by all of them, or by none, so a request refused by one
-- limit never uses up another. Each limit is an exact sliding log: a sorted
-- set of the units it admitted, scored by the millisecond of admission.
-- The clock is Redis's own, so every API process shares one time.
-- KEYS: one sorted set per limit
-- ARGV: a nonce unique to this call, then per limit: most units, window ms,
--       units this request costs
-- Returns {admitted (1/0), index of the limit that refused (1-based, 0 if
-- admitted), ms until the request could be admitted (0 if admitted),
-- then per limit: units remaining, ms until its oldest unit leaves}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local counts = {}
local refused, wait = 0, 0
for i = 1, n do
  local limit = tonumber(ARGV[3 * i - 1])
  local window = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  -- A unit admitted at s counts while now < s + window.
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local count = redis.call('ZCARD', KEYS[i])
  counts[i] = count
  if cost > 0 and count + cost > limit then
    local w = window
    if cost <= limit then
      -- Room for `cost` more once the (count + cost - limit) oldest left.
      local k = count + cost - limit - 1
      local e = redis.call('ZRANGE', KEYS[i], k, k, 'WITHSCORES')
      w = tonumber(e[2]) + window - now
    end
    if w > wait then refused, wait = i, w end
  end
end
local admitted = refused == 0
local out = {admitted and 1 or 0, refused, wait}
for i = 1, n do
  local limit = tonumber(ARGV[3 * i - 1])
  local window = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  local count = counts[i]
  if admitted and cost > 0 then
    local members = {}
    for j = 1, cost do
      members[#members + 1] = now
      members[#members + 1] = ARGV[1] .. ':' .. j
    end
    redis.call('ZADD', KEYS[i], unpack(members))
    redis.call('PEXPIRE', KEYS[i], window)
    count = count + cost
  end
  local reset = 0
  local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if oldest[2] then reset = tonumber(oldest[2]) + window - now end
  out[#out + 1] = math.max(limit - count, 0)
  out[#out + 1] = reset
end
return out
