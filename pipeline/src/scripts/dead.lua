-- Gives up on an image: acknowledge it, append it to the dead-letter stream
-- with why and when, and record the failure on its job.
-- KEYS: this stage's stream, dead-letter stream, job, admitted counter,
--       stage counters, stage counters of this minute, webhook registry,
--       webhook outbox
-- ARGV: group, entry id, event payload, image index, stage, error,
--       attempts, now ms, dead-letter max length, finished channel,
--       job id, vendor, progress channel, '1' if the image holds an
--       admission slot, counter field, minute counters' TTL s
-- Returns 1 if the job closed, 0 if not, -1 for a duplicate delivery.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return -1 end
count_event(KEYS[5], KEYS[6], ARGV[15], ARGV[16])
release_slot(KEYS[4], ARGV[14])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[9], '*',
  'stage', ARGV[5], 'job', ARGV[11], 'vendor', ARGV[12], 'image', ARGV[4],
  'error', ARGV[6], 'attempts', ARGV[7], 'failed_ms', ARGV[8], 'e', ARGV[3])
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
local i = ARGV[4]
redis.call('HSET', KEYS[3], i .. ':status', IMAGE.failed, i .. ':error', ARGV[6],
  i .. ':attempts', ARGV[7], 'updated_ms', ARGV[8])
redis.call('HINCRBY', KEYS[3], 'failed', 1)
progress(ARGV[13], ARGV[11], i, ARGV[5], IMAGE.failed)
return close_job_if_done(KEYS[3], ARGV[8], ARGV[10], {registry = KEYS[7], outbox = KEYS[8]})
