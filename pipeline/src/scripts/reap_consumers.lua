-- Removes a group's consumers that have been idle for long and hold no
-- pending entries. Checking and deleting in one script means a consumer
-- cannot receive an entry between the check and its removal.
-- KEYS: stream
-- ARGV: group, minimum idle ms, a consumer to keep (the caller)
-- Returns the number of consumers removed.
local removed = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name, pending, idle
  for j = 1, #c, 2 do
    if c[j] == 'name' then name = c[j + 1]
    elseif c[j] == 'pending' then pending = tonumber(c[j + 1])
    elseif c[j] == 'idle' then idle = tonumber(c[j + 1]) end
  end
  if name ~= ARGV[3] and pending == 0 and idle >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    removed = removed + 1
  end
end
return removed
