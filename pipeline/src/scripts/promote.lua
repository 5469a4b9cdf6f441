-- Moves events whose retry time has come back onto their stage's stream.
-- KEYS: retry set, stream
-- ARGV: now ms, most to move
-- Returns {moved, ms the next one is due or -1}.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, payload in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'e', payload)
end
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, tonumber(nxt[2] or '-1')}
