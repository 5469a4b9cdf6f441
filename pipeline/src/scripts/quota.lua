-- Charges one image against its vendor's processing quotas, one per
-- operation it asks for: all of them or none. Each quota is an exact
-- sliding log of the images it admitted. An image already charged (a
-- redelivery, or a retry after a throttle) is admitted without a second
-- charge. The clock is Redis's own.
-- KEYS: one sorted set per quota
-- ARGV: the image's member (job:image), then per quota: most images, window ms
-- Returns 0 if admitted, else the ms until the image fits.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = ARGV[1]
local charged = true
for i = 1, #KEYS do
  if not redis.call('ZSCORE', KEYS[i], member) then charged = false end
end
if charged then return 0 end
local wait = 0
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  if not redis.call('ZSCORE', KEYS[i], member) and redis.call('ZCARD', KEYS[i]) >= limit then
    -- Fits once the oldest charges have left the window.
    local k = redis.call('ZCARD', KEYS[i]) - limit
    local e = redis.call('ZRANGE', KEYS[i], k, k, 'WITHSCORES')
    local w = tonumber(e[2]) + window - now
    if w > wait then wait = w end
  end
end
if wait > 0 then return math.max(wait, 1) end
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now, member)
  redis.call('PEXPIRE', KEYS[i], ARGV[2 * i + 1])
end
return 0
