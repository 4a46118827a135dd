-- More messages in the same fetch, each recorded as unacknowledged.
-- KEYS: queue, unacked_index, unacked; ARGV: most to take, now (client time, as kombu scores).
-- Takes messages off the queue and records each as unacknowledged, exactly as kombu's
-- `QoS.append` would, in one atomic step: nothing is ever off the queue and unrecorded.
-- A message without a readable delivery tag goes back where it was and ends the batch (the
-- normal fetch then deals with it). Returns the messages taken.
local out = {}
for _ = 1, tonumber(ARGV[1]) do
  local raw = redis.call('RPOP', KEYS[1])
  if not raw then break end
  local ok, msg = pcall(cjson.decode, raw)
  local props = ok and type(msg) == 'table' and msg['properties']
  local tag = type(props) == 'table' and props['delivery_tag']
  if type(tag) ~= 'string' then
    redis.call('RPUSH', KEYS[1], raw)
    break
  end
  local info = type(props['delivery_info']) == 'table' and props['delivery_info'] or {}
  redis.call('ZADD', KEYS[2], ARGV[2], tag)
  redis.call('HSET', KEYS[3], tag, '[' .. raw .. ',' .. cjson.encode(info['exchange'] or '')
    .. ',' .. cjson.encode(info['routing_key'] or '') .. ']')
  out[#out + 1] = raw
end
return out
