-- Moves an image to the next stage: acknowledge here, publish there,
-- record where it is, all at once.
-- KEYS: this stage's stream, next stage's stream, job, admitted counter,
--       stage counters, stage counters of this minute
-- ARGV: group, entry id, event payload, image index, next stage, now ms,
--       finished channel, progress channel, job id, '1' if the image
--       holds an admission slot, counter field, minute counters' TTL s
-- Returns 1 if published, 0 if the entry was already acknowledged (a
-- duplicate delivery: nothing is published twice), 2 if the job was
-- cancelled or is gone.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
count_event(KEYS[5], KEYS[6], ARGV[11], ARGV[12])
local status = redis.call('HGET', KEYS[3], 'status')
if not status then return 2 end
if skip_if_cancelled(KEYS[3], ARGV[4], status, ARGV[6], ARGV[7], KEYS[4], ARGV[10]) then return 2 end
redis.call('XADD', KEYS[2], '*', 'e', ARGV[3])
local i = ARGV[4]
redis.call('HSET', KEYS[3], i .. ':stage', ARGV[5], i .. ':status', 'processing',
  'status', 'processing', 'updated_ms', ARGV[6])
progress(ARGV[8], ARGV[9], i, ARGV[5], 'processing')
return 1
