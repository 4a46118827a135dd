-- After fetch_lib.lua. Puts back what consumers fetched and never recorded.
-- KEYS: consumers, queues, unacked; ARGV: inflight prefix, dead after s, limit, own id or ''.
-- With an id: that consumer's leftovers (it is closing; it stays registered, so a fetch that
-- still lands on its list is swept later). Without: every consumer silent for `dead after`.
-- Returns how many messages went back.
if ARGV[4] ~= '' then
  return restore(ARGV[4], ARGV[1], KEYS[2], KEYS[3])
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now() - tonumber(ARGV[2]),
  'LIMIT', 0, tonumber(ARGV[3]))
local n = 0
for _, id in ipairs(dead) do
  n = n + restore(id, ARGV[1], KEYS[2], KEYS[3])
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end
return n
