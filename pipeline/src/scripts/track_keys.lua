-- Key tracking, for tests (Scripts::tracking_keys): put in front of a
-- script, it makes every redis.call and redis.pcall fail when it names a
-- key the caller did not pass in KEYS. A Redis Cluster checks only the
-- declared keys before it runs a script; one it derives inside may be
-- elsewhere, or half-way through a slot's migration.
local declared_keys = {}
for _, k in ipairs(KEYS) do declared_keys[k] = true end
local untracked_redis = redis
local function keys_named(cmd, args)
  cmd = string.upper(cmd)
  if cmd == 'PUBLISH' or cmd == 'TIME' then return {} end
  if cmd == 'DEL' or cmd == 'EXISTS' or cmd == 'UNLINK' or cmd == 'TOUCH' or cmd == 'MGET' then return args end
  if cmd == 'XGROUP' or cmd == 'XINFO' then return {args[2]} end
  return {args[1]}
end
local function check_keys(cmd, ...)
  for _, k in ipairs(keys_named(cmd, {...})) do
    if not declared_keys[k] then
      error('key tracking: ' .. cmd .. ' named ' .. tostring(k) .. ', which the caller did not pass in KEYS')
    end
  end
end
local redis = setmetatable({
  call = function(cmd, ...) check_keys(cmd, ...) return untracked_redis.call(cmd, ...) end,
  pcall = function(cmd, ...) check_keys(cmd, ...) return untracked_redis.pcall(cmd, ...) end,
}, {__index = untracked_redis})
