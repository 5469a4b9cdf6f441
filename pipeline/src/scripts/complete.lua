-- Finishes an image after the last stage: acknowledge and record its
-- outputs, closing the job when it was the last image.
-- KEYS: this stage's stream, job, admitted counter, stage counters,
--       stage counters of this minute
-- ARGV: group, entry id, image index, outputs JSON, now ms, finished channel,
--       notes JSON, progress channel, job id, '1' if the image holds an
--       admission slot, counter field, minute counters' TTL s
-- Returns 1 if the job closed, 0 if not, -1 for a duplicate delivery.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return -1 end
count_event(KEYS[4], KEYS[5], ARGV[11], ARGV[12])
release_slot(KEYS[3], ARGV[10])
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local i = ARGV[3]
redis.call('HSET', KEYS[2], i .. ':status', 'completed', i .. ':stage', 'done',
  i .. ':outputs', ARGV[4], i .. ':notes', ARGV[7], 'updated_ms', ARGV[5])
redis.call('HINCRBY', KEYS[2], 'done', 1)
progress(ARGV[8], ARGV[9], i, 'done', 'completed')
return close_job_if_done(KEYS[2], ARGV[5], ARGV[6])
