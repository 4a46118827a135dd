-- What BLMOVE does for one queue, for the first of several that holds a message, without
-- blocking (workers/broker.py, a consumer of several lanes).
-- KEYS: the in-flight list, queues... (highest priority first). Returns {queue, message}, or
-- false when every queue is empty.
for q = 2, #KEYS do
  local raw = redis.call('LMOVE', KEYS[q], KEYS[1], 'RIGHT', 'LEFT')
  if raw then return {KEYS[q], raw} end
end
return false
