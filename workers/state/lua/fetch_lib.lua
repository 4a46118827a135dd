-- The loss-free fetch's shared functions (workers/broker.py, docs/fetch.md).
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
-- Puts back on its queue every message of consumer `id` that `unacked` does not hold: the
-- queue its routing key names (a consumer of several lanes), else the one it consumed.
local function restore(id, prefix, queues, unacked)
  local list = prefix .. id
  local queue = redis.call('HGET', queues, id)
  if not queue then return 0 end
  local items = redis.call('LRANGE', list, 0, -1)
  local n = 0
  for i = #items, 1, -1 do
    local raw = items[i]
    local ok, msg = pcall(cjson.decode, raw)
    local props = ok and type(msg) == 'table' and msg['properties']
    local tag = type(props) == 'table' and props['delivery_tag']
    if not (tag and redis.call('HEXISTS', unacked, tag) == 1) then
      local info = type(props) == 'table' and props['delivery_info']
      local key = type(info) == 'table' and info['exchange'] == '' and info['routing_key']
      redis.call('RPUSH', (type(key) == 'string' and key ~= '') and key or queue, raw)
      n = n + 1
    end
  end
  redis.call('DEL', list)
  return n
end
