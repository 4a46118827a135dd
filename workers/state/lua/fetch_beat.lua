-- After fetch_lib.lua. The consumer's heartbeat, before every fetch.
-- KEYS: consumers, queues; ARGV: id, queue.
redis.call('ZADD', KEYS[1], now(), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
