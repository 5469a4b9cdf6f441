-- Finishes a batch of events one stage handled, each in one of three ways:
-- 'h' hands it off to the next stage, 'p' parks it in its vendor's queue
-- for the fair scheduler (see dispatch.lua), 'c' completes its image after
-- the last stage. Each event is acknowledged here and moved on in the same
-- step, so it is never both pending here and queued there, nor neither.
-- One call serves the whole batch: the counters, the progress
-- announcement and the closed jobs' announcement (one line each, on the
-- finished channel) are written once for it, not once per event.
-- KEYS: this stage's stream, admitted counter, stage counters, stage
--       counters of this minute, vendor ring, webhook registry, webhook
--       outbox, then per event: its job and its target (next stage's
--       stream, vendor queue, or the job again)
-- ARGV: group, now ms, finished channel, progress channel, minute
--       counters' TTL s, then per event: kind, entry id, image index,
--       '1' if the image holds an admission slot, data (event payload,
--       queue item, or outputs JSON), detail (next stage, vendor, or notes
--       JSON), progress announcement (JSON, '' for none)
-- Returns per event: 0 for a duplicate delivery (already acknowledged:
-- nothing is done twice), 1 moved on or completed, 2 cancelled or gone,
-- 3 completed and closed its job with no image failed, 4 completed and
-- closed its job with failed images.
local stream, ring = KEYS[1], KEYS[5]
local hooks = {registry = KEYS[6], outbox = KEYS[7]}
local group, now, finished, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local results, announced, closed, in_ring, known_hooks = {}, {}, {}, {}, {}
local processed, released = 0, 0
for e = 0, (#ARGV - 5) / 7 - 1 do
  local a = 5 + 7 * e
  local kind, id, i, slot = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local data, detail, note = ARGV[a + 5], ARGV[a + 6], ARGV[a + 7]
  local job, target = KEYS[8 + 2 * e], KEYS[9 + 2 * e]
  local r = 0
  if redis.call('XACK', stream, group, id) == 1 then
    processed = processed + 1
    if kind == 'c' then
      if slot == '1' then released = released + 1 end
      r = 1
      -- Read once what closing needs; the image's outcome, the count and
      -- (when it was the last image) the job's end are then one write.
      local v = redis.call('HMGET', job, 'images', 'done', 'failed', 'skipped', 'status', 'id', 'vendor')
      local n = tonumber(v[1] or '0')
      if n > 0 then
        local done = tonumber(v[2] or '0') + 1
        local failed, skipped = tonumber(v[3] or '0'), tonumber(v[4] or '0')
        local fields = {i .. ':status', IMAGE.completed, i .. ':stage', 'done', i .. ':outputs', data,
          i .. ':notes', detail, 'done', done, 'updated_ms', now}
        local status
        if done + failed + skipped >= n then
          status = final_status(v[5], done, failed)
          fields[#fields + 1] = 'status'; fields[#fields + 1] = status
          fields[#fields + 1] = 'finished_ms'; fields[#fields + 1] = now
          r = failed == 0 and 3 or 4
        end
        redis.call('HSET', job, unpack(fields))
        announced[#announced + 1] = note
        if status then
          closed[#closed + 1] = v[6] .. ' ' .. status
          notify_webhook(hooks, v[6], v[7], status, now, known_hooks)
        end
      end
    else
      local status = redis.call('HGET', job, 'status')
      if not status then
        -- The job record is gone (expired or deleted): the image ends
        -- here, and so does its hold on the admission window.
        if slot == '1' then released = released + 1 end
        r = 2
      elseif kind == 'h' then
        if skip_if_cancelled(job, i, status, now, finished, hooks, KEYS[2], slot) then
          r = 2
        else
          redis.call('XADD', target, '*', 'e', data)
          redis.call('HSET', job, i .. ':stage', detail, i .. ':status', IMAGE.processing,
            'status', JOB.processing, 'updated_ms', now)
          announced[#announced + 1] = note
          r = 1
        end
      elseif skip_if_cancelled(job, i, status, now, finished, hooks) then
        -- A parked image holds no admission slot yet.
        r = 2
      else
        redis.call('RPUSH', target, data)
        if not in_ring[detail] then
          if not redis.call('LPOS', ring, detail) then redis.call('RPUSH', ring, detail) end
          in_ring[detail] = true
        end
        redis.call('HSET', job, i .. ':status', IMAGE.waiting, 'updated_ms', now)
        r = 1
      end
    end
  end
  results[#results + 1] = r
end
if processed > 0 then count_event(KEYS[3], KEYS[4], 'processed', ARGV[5], processed) end
if released > 0 then release_slots(KEYS[2], released) end
if #announced > 0 then redis.call('PUBLISH', channel, '[' .. table.concat(announced, ',') .. ']') end
if #closed > 0 then redis.call('PUBLISH', finished, table.concat(closed, '\n')) end
return results
