-- More messages in the same fetch, each recorded as unacknowledged.
-- KEYS: unacked_index, unacked, queues... (highest priority first); ARGV: most to take, now
-- (client time, as kombu scores). Takes messages off the queues, a higher one emptied before a
-- lower one is touched, and records each as unacknowledged, exactly as kombu's `QoS.append`
-- would, in one atomic step: nothing is ever off a queue and unrecorded. A message without a
-- readable delivery tag goes back where it was and ends the batch (the normal fetch then deals
-- with it). Returns queue, message pairs.
local out = {}
local most = tonumber(ARGV[1])
for q = 3, #KEYS do
  while #out < 2 * most do
    local raw = redis.call('RPOP', KEYS[q])
    if not raw then break end
    local ok, msg = pcall(cjson.decode, raw)
    local props = ok and type(msg) == 'table' and msg['properties']
    local tag = type(props) == 'table' and props['delivery_tag']
    if type(tag) ~= 'string' then
      redis.call('RPUSH', KEYS[q], raw)
      return out
    end
    local info = type(props['delivery_info']) == 'table' and props['delivery_info'] or {}
    redis.call('ZADD', KEYS[1], ARGV[2], tag)
    redis.call('HSET', KEYS[2], tag, '[' .. raw .. ',' .. cjson.encode(info['exchange'] or '')
      .. ',' .. cjson.encode(info['routing_key'] or '') .. ']')
    out[#out + 1] = KEYS[q]
    out[#out + 1] = raw
  end
end
return out
