-- Records a new job and queues one event per image on the first stage.
-- KEYS: job, first stream, vendor's job index, idempotency key (or '')
-- ARGV: job id, vendor, now ms, retention s, ops, image count,
--       then per image: record id, event payload
-- Returns the job id; an existing one if the idempotency key was seen.
if KEYS[4] ~= '' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {existing, 0} end
  redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[4])
end
local n = tonumber(ARGV[6])
local fields = {'id', ARGV[1], 'vendor', ARGV[2], 'status', 'queued', 'created_ms', ARGV[3],
  'updated_ms', ARGV[3], 'images', n, 'ops', ARGV[5], 'done', 0, 'failed', 0, 'skipped', 0}
for i = 0, n - 1 do
  local rec = ARGV[7 + 2 * i]
  local k = tostring(i)
  fields[#fields + 1] = k .. ':record'; fields[#fields + 1] = rec
  fields[#fields + 1] = k .. ':stage'; fields[#fields + 1] = 'rate-check'
  fields[#fields + 1] = k .. ':status'; fields[#fields + 1] = 'queued'
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[4])
for i = 0, n - 1 do
  redis.call('XADD', KEYS[2], '*', 'e', ARGV[8 + 2 * i])
end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
-- The index drops jobs past retention now and then, not on every submit
-- (one in 16, by the job id's random last digit): a few expired ids
-- linger a little longer (listing skips them), and most submits save a
-- command.
if string.sub(ARGV[1], -1) == '0' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', tonumber(ARGV[3]) - tonumber(ARGV[4]) * 1000)
end
redis.call('EXPIRE', KEYS[3], ARGV[4])
return {ARGV[1], 1}
