-- Helpers shared by the scripts; prepended to each when it is loaded.

-- Frees n admission slots (images that were admitted downstream).
local function release_slots(counter, n)
  if tonumber(redis.call('DECRBY', counter, n)) < 0 then redis.call('SET', counter, 0) end
end

-- Frees the admission slot an image held, if it was admitted downstream.
local function release_slot(counter, admitted)
  if admitted == '1' then release_slots(counter, 1) end
end

-- Counts n finished events (one if n is not given) in their stage's
-- lifetime counters and this minute's (see metrics.rs), inside the step
-- that finished them: a duplicate delivery returns before reaching this,
-- so nothing is counted twice, and no extra round trip is spent on counting.
-- field: processed, retried, throttled or dead; retried and dead are
-- failed attempts too.
local function count_event(total, minute, field, ttl, n)
  n = n or 1
  redis.call('HINCRBY', total, field, n)
  redis.call('HINCRBY', minute, field, n)
  if field == 'retried' or field == 'dead' then
    redis.call('HINCRBY', total, 'failed', n)
    redis.call('HINCRBY', minute, 'failed', n)
  end
  redis.call('EXPIRE', minute, ttl)
end

-- Announces an image's stage transition on the progress channel, for the
-- API's live event streams. Published inside the step that made the
-- transition, so announcements arrive in the order the steps happened.
-- One transition as the progress channel carries it (the same shape as
-- finish.rs's `progress_note`, which finish.lua publishes in batches).
local function progress_note(job, i, stage, status)
  return cjson.encode({job = job, image = tonumber(i), stage = stage, status = status})
end

local function progress(channel, job, i, stage, status)
  redis.call('PUBLISH', channel, progress_note(job, i, stage, status))
end

-- The terminal status of a job all of whose images have ended.
local function final_status(status, done, failed)
  if status == JOB.cancelled then return status end
  if failed == 0 then return JOB.completed end
  if done == 0 then return JOB.failed end
  return JOB.partially_failed
end

-- Tells the vendor's webhook, if it has one, that a job closed: in the
-- same step as the closing. `hooks` names the declared keys of the
-- webhook registry and outbox ({registry = …, outbox = …}). `known`, if
-- given, caches per vendor whether it has a webhook, for a step that
-- closes many jobs.
local function notify_webhook(hooks, id, vendor, status, now, known)
  if not vendor then return end
  local has = known and known[vendor]
  if has == nil then
    has = redis.call('HEXISTS', hooks.registry, vendor) == 1
    if known then known[vendor] = has end
  end
  if has then
    redis.call('XADD', hooks.outbox, '*', 'job', id, 'vendor', vendor,
      'status', status, 'finished_ms', tostring(now), 'attempt', '1')
  end
end

-- Closes the job if every image has reached an end (done, failed or
-- skipped), announcing it on the finished channel ("<job id> <status>").
-- Returns 0 if the job is still open, 1 if it closed with no image failed,
-- 2 if it closed with failed images (their blobs are kept for replaying
-- the dead letters).
local function close_job_if_done(job, now, channel, hooks)
  local v = redis.call('HMGET', job, 'images', 'done', 'failed', 'skipped', 'status', 'id', 'vendor')
  local n = tonumber(v[1] or '0')
  local done, failed, skipped = tonumber(v[2] or '0'), tonumber(v[3] or '0'), tonumber(v[4] or '0')
  if n == 0 or done + failed + skipped < n then return 0 end
  local status = final_status(v[5], done, failed)
  redis.call('HSET', job, 'status', status, 'finished_ms', now, 'updated_ms', now)
  redis.call('PUBLISH', channel, v[6] .. ' ' .. status)
  notify_webhook(hooks, v[6], v[7], status, now)
  if failed > 0 then return 2 end
  return 1
end

-- For a cancelled job: records the image as skipped instead of moving it
-- on. Returns true if the job was cancelled.
local function skip_if_cancelled(job, i, status, now, channel, hooks, counter, admitted)
  if status ~= JOB.cancelled then return false end
  if counter then release_slot(counter, admitted) end
  redis.call('HSET', job, i .. ':status', IMAGE.cancelled, 'updated_ms', now)
  redis.call('HINCRBY', job, 'skipped', 1)
  close_job_if_done(job, now, channel, hooks)
  return true
end
