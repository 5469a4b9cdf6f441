-- Records a new job and queues one event per image on the first stage.
-- KEYS: job, first stream, vendor's job index, then the idempotency key
--       when the submit carries one (absent otherwise)
-- ARGV: job id, vendor, now ms, retention s, ops, image count, request
--       fingerprint ('' for none), then per image: record id, event payload
-- Returns {job id, 1, ''} for a new job; {earlier job id, 0, its request's
-- fingerprint} when the idempotency key was seen.
-- Nothing is written before every check has passed, and the idempotency
-- record goes last: a script that fails half-way (Redis out of memory)
-- never leaves a key pointing at a job that was not recorded.
local idem = KEYS[4]
if idem then
  local existing = redis.call('GET', idem)
  if existing then
    local id, fingerprint = string.match(existing, '^([^\n]*)\n?(.*)$')
    return {id, 0, fingerprint}
  end
end
local n = tonumber(ARGV[6])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'vendor', ARGV[2], 'status', JOB.queued, 'created_ms', ARGV[3],
  'updated_ms', ARGV[3], 'images', n, 'ops', ARGV[5], 'done', 0, 'failed', 0, 'skipped', 0)
-- Per-image fields go in slices: unpack() of a whole large job would pass
-- Lua's limit on a call's arguments.
local fields = {}
for i = 0, n - 1 do
  local k = tostring(i)
  fields[#fields + 1] = k .. ':record'; fields[#fields + 1] = ARGV[8 + 2 * i]
  fields[#fields + 1] = k .. ':stage'; fields[#fields + 1] = 'rate-check'
  fields[#fields + 1] = k .. ':status'; fields[#fields + 1] = IMAGE.queued
  if #fields >= 600 or i == n - 1 then
    redis.call('HSET', KEYS[1], unpack(fields))
    fields = {}
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
for i = 0, n - 1 do
  redis.call('XADD', KEYS[2], '*', 'e', ARGV[9 + 2 * i])
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
if idem then
  local value = ARGV[1]
  if ARGV[7] ~= '' then value = value .. '\n' .. ARGV[7] end
  redis.call('SET', idem, value, 'EX', ARGV[4])
end
return {ARGV[1], 1, ''}
