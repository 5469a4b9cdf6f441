-- Settles one webhook notice: acknowledged and removed from the outbox,
-- another attempt scheduled if there is one, the outcome written on the
-- job record (if the record still exists: an expired job is not revived).
-- KEYS: webhook outbox, webhook retry set, then the job when known
-- ARGV: group, entry id, outcome text ('' for none), retry member ('' for
--       none), retry due ms
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
end
if ARGV[3] ~= '' and KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'webhook', ARGV[3])
end
return 1
