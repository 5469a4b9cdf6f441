-- Admits an image to its vendor's queue instead of straight downstream:
-- the dispatcher then feeds downstream stages from all vendors' queues in
-- weighted round-robin, so one vendor's backlog cannot bury another's.
-- KEYS: rate-check stream, vendor queue, vendor ring, job, stage
--       counters, stage counters of this minute
-- ARGV: group, entry id, item (next stage, job key, job id, image, payload
--       joined by tabs), vendor, image index, now ms, finished channel,
--       counter field, minute counters' TTL s
-- Returns 1 if queued, 0 for a duplicate delivery, 2 if the job was
-- cancelled or is gone.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
count_event(KEYS[5], KEYS[6], ARGV[8], ARGV[9])
local status = redis.call('HGET', KEYS[4], 'status')
if not status then return 2 end
if skip_if_cancelled(KEYS[4], ARGV[5], status, ARGV[6], ARGV[7]) then return 2 end
redis.call('RPUSH', KEYS[2], ARGV[3])
if not redis.call('LPOS', KEYS[3], ARGV[4]) then
  redis.call('RPUSH', KEYS[3], ARGV[4])
end
redis.call('HSET', KEYS[4], ARGV[5] .. ':status', 'waiting', 'updated_ms', ARGV[6])
return 1
