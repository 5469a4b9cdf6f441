-- Helpers shared by the scripts; prepended to each when it is loaded.

-- Frees the admission slot an image held, if it was admitted downstream.
local function release_slot(counter, admitted)
  if admitted ~= '1' then return end
  if tonumber(redis.call('DECR', counter)) < 0 then redis.call('SET', counter, 0) end
end

-- Counts one finished event in its stage's lifetime counters and this
-- minute's (see metrics.rs), inside the step that finished it: a duplicate
-- delivery returns before reaching this, so nothing is counted twice, and
-- no extra round trip is spent on counting.
-- field: processed, retried, throttled or dead; retried and dead are
-- failed attempts too.
local function count_event(total, minute, field, ttl)
  redis.call('HINCRBY', total, field, 1)
  redis.call('HINCRBY', minute, field, 1)
  if field == 'retried' or field == 'dead' then
    redis.call('HINCRBY', total, 'failed', 1)
    redis.call('HINCRBY', minute, 'failed', 1)
  end
  redis.call('EXPIRE', minute, ttl)
end

-- Announces an image's stage transition on the progress channel, for the
-- API's live event streams. Published inside the step that made the
-- transition, so announcements arrive in the order the steps happened.
local function progress(channel, job, i, stage, status)
  redis.call('PUBLISH', channel, cjson.encode({job = job, image = tonumber(i), stage = stage, status = status}))
end

-- Closes the job if every image has reached an end (done, failed or
-- skipped), announcing it on the finished channel. Returns 1 if it closed.
local function close_job_if_done(job, now, channel)
  local v = redis.call('HMGET', job, 'images', 'done', 'failed', 'skipped', 'status', 'id', 'vendor')
  local n = tonumber(v[1] or '0')
  local done, failed, skipped = tonumber(v[2] or '0'), tonumber(v[3] or '0'), tonumber(v[4] or '0')
  if n == 0 or done + failed + skipped < n then return 0 end
  local status = v[5]
  if status ~= 'cancelled' then
    if failed == 0 then status = 'completed'
    elseif done == 0 then status = 'failed'
    else status = 'partially_failed' end
  end
  redis.call('HSET', job, 'status', status, 'finished_ms', now, 'updated_ms', now)
  redis.call('PUBLISH', channel, v[6] .. ' ' .. status)
  -- The vendor's webhook, if it has one, is told in this same step (the
  -- keys share the job key's hash tag; see keys.rs).
  local base = string.match(job, '^(.*):job:[^:]*$')
  local vendor = v[7]
  if base and vendor and redis.call('HEXISTS', base .. ':webhooks', vendor) == 1 then
    redis.call('XADD', base .. ':webhook-outbox', '*', 'job', v[6], 'vendor', vendor,
      'status', status, 'finished_ms', tostring(now), 'attempt', '1')
  end
  return 1
end

-- For a cancelled job: records the image as skipped instead of moving it
-- on. Returns true if the job was cancelled.
local function skip_if_cancelled(job, i, status, now, channel, counter, admitted)
  if status ~= 'cancelled' then return false end
  if counter then release_slot(counter, admitted) end
  redis.call('HSET', job, i .. ':status', 'cancelled', 'updated_ms', now)
  redis.call('HINCRBY', job, 'skipped', 1)
  close_job_if_done(job, now, channel)
  return true
end
