-- The lease semaphore's release. Idempotent.
-- KEYS: holders/meta pairs, waiting. ARGV: channel, memory_ms, ids... Publishes
-- "<slots freed> <processes waiting>" (processes that failed to acquire within memory_ms), so
-- that each waiting process wakes a waiter for a freed slot only with probability ~FANOUT/N.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local removed = 0
for i = 1, #KEYS - 1, 2 do
  local r = redis.call('ZREM', KEYS[i], unpack(ARGV, 3))
  redis.call('HDEL', KEYS[i + 1], unpack(ARGV, 3))
  if r > removed then removed = r end
end
if removed > 0 then
  local waiting = KEYS[#KEYS]
  redis.call('ZREMRANGEBYSCORE', waiting, '-inf', now - tonumber(ARGV[2]))
  redis.call('PUBLISH', ARGV[1], removed .. ' ' .. redis.call('ZCARD', waiting))
end
return removed
