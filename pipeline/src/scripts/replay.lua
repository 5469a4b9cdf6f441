-- Puts a dead-lettered image back to work: queue its event on a stage's
-- stream, drop the dead letter, and undo the failure on its job (the image
-- is queued again, the job's failed count goes down and a job that had
-- ended is open again, so its end is recomputed when the image finishes).
-- The replay is recorded on the image and in the replay log.
-- KEYS: dead-letter stream, target stage's stream, job, replay log
-- ARGV: dead-letter id, event payload (attempts reset), image index,
--       target stage, now ms, replay log max length, job id, vendor,
--       stage it failed in
-- Returns 1 if replayed, 0 if there is no such dead letter, -1 if the job
-- is gone, -2 if the image is not failed (already replayed?), -3 if the
-- job was cancelled.
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return 0 end
local i = ARGV[3]
local v = redis.call('HMGET', KEYS[3], 'status', i .. ':status')
if not v[1] then return -1 end
if v[1] == JOB.cancelled then return -3 end
if v[2] ~= IMAGE.failed then return -2 end
redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'failed', -1)
redis.call('HINCRBY', KEYS[3], i .. ':replays', 1)
redis.call('HSET', KEYS[3], i .. ':status', IMAGE.queued, i .. ':stage', ARGV[4],
  i .. ':attempts', 0, i .. ':error', '', i .. ':replayed_ms', ARGV[5], 'updated_ms', ARGV[5])
local s = v[1]
if JOB_ENDED[s] then
  redis.call('HSET', KEYS[3], 'status', JOB.processing)
  redis.call('HDEL', KEYS[3], 'finished_ms')
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'dead_id', ARGV[1],
  'from', ARGV[9], 'to', ARGV[4], 'job', ARGV[7], 'vendor', ARGV[8], 'image', i,
  'replayed_ms', ARGV[5])
return 1
