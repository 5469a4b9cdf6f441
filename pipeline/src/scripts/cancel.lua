-- Cancels a vendor's job: images not yet finished are skipped as they
-- reach their next step.
-- KEYS: job
-- ARGV: vendor, now ms, progress channel, job id
-- Returns 1 if cancelled, 0 if there is no such job for this vendor,
-- -1 if the job had already ended.
local v = redis.call('HMGET', KEYS[1], 'vendor', 'status')
if not v[1] or v[1] ~= ARGV[1] then return 0 end
local s = v[2]
if JOB_ENDED[s] then return -1 end
redis.call('HSET', KEYS[1], 'status', JOB.cancelled, 'cancelled_ms', ARGV[2], 'updated_ms', ARGV[2])
redis.call('PUBLISH', ARGV[3], cjson.encode({job = ARGV[4], stage = 'job', status = JOB.cancelled}))
return 1
