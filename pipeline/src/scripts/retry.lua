-- Sets an image aside until it is due again: after a retryable failure
-- (status 'retrying') or while its vendor's quota refills ('throttled').
-- The entry is acknowledged and the event moved to the stage's retry set in
-- one step, so it is never both pending and scheduled, nor neither.
-- KEYS: this stage's stream, this stage's retry set, job, admitted counter,
--       stage counters, stage counters of this minute, webhook registry,
--       webhook outbox
-- ARGV: group, entry id, event payload, due ms, image index, status,
--       reason, attempts, now ms, finished channel, progress channel,
--       job id, stage, '1' if the image holds an admission slot, counter
--       field, minute counters' TTL s
-- Returns 1 if scheduled, 0 for a duplicate delivery, 2 if the job was
-- cancelled or is gone.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
count_event(KEYS[5], KEYS[6], ARGV[15], ARGV[16])
local status = redis.call('HGET', KEYS[3], 'status')
if not status then
  -- The job record is gone (expired or deleted): the image ends here, and
  -- so does its hold on the admission window.
  release_slot(KEYS[4], ARGV[14])
  return 2
end
local hooks = {registry = KEYS[7], outbox = KEYS[8]}
if skip_if_cancelled(KEYS[3], ARGV[5], status, ARGV[9], ARGV[10], hooks, KEYS[4], ARGV[14]) then return 2 end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
local i = ARGV[5]
redis.call('HSET', KEYS[3], i .. ':status', ARGV[6], i .. ':error', ARGV[7],
  i .. ':attempts', ARGV[8], i .. ':resume_ms', ARGV[4], 'updated_ms', ARGV[9])
progress(ARGV[11], ARGV[12], i, ARGV[13], ARGV[6])
return 1
