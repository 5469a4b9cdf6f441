-- Moves webhook notices whose retry is due back into the outbox, each
-- removed from the retry set in the same step it is re-queued, so one is
-- never sent twice by two promoters nor lost between them.
-- KEYS: webhook retry set, webhook outbox
-- ARGV: now ms, most to move
-- Returns how many moved.
local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  local n = cjson.decode(member)
  redis.call('XADD', KEYS[2], '*', 'job', n.job, 'vendor', n.vendor, 'status', n.status,
    'finished_ms', tostring(n.finished_ms), 'attempt', tostring(n.attempt))
end
return #due
