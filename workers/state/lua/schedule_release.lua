-- Releases what the durable schedule holds that is due (workers/state/schedule.py,
-- docs/scheduling.md): each item goes onto its queue and leaves the schedule in the same
-- atomic step, so every worker may run this (no leader) and nothing is released twice.
-- KEYS: the due ZSET, the items HASH; ARGV: the most to release. Returns how many were due.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  local item = redis.call('HGET', KEYS[2], id)
  if item then
    local nl = string.find(item, '\n', 1, true)
    if nl then
      redis.call('LPUSH', string.sub(item, 1, nl - 1), string.sub(item, nl + 1))
    end
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREM', KEYS[1], id)
end
return #ids
