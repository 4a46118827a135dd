-- The loss-free fetch's shared functions (workers/broker.py, docs/fetch.md).
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
-- Puts back on its queue every message of consumer `id` that `unacked` does not hold.
local function restore(id, prefix, queues, unacked)
  local list = prefix .. id
  local queue = redis.call('HGET', queues, id)
  if not queue then return 0 end
  local items = redis.call('LRANGE', list, 0, -1)
  local n = 0
  for i = #items, 1, -1 do
    local raw = items[i]
    local ok, msg = pcall(cjson.decode, raw)
    local tag = ok and type(msg) == 'table' and type(msg['properties']) == 'table'
      and msg['properties']['delivery_tag']
    if not (tag and redis.call('HEXISTS', unacked, tag) == 1) then
      redis.call('RPUSH', queue, raw)
      n = n + 1
    end
  end
  redis.call('DEL', list)
  return n
end
