-- One of our own transitions of a message (the worker's 250, a suppression; mailer/lifecycle.py).
-- KEYS: status record, the relay-id key (only with a relay id).
-- ARGV: message id, state, reply, relay id, ttl s, reason, recipients JSON ({} for none).
local rec = load(KEYS[1])
enter(rec, ARGV[2], now())
if ARGV[3] ~= '' then push(rec['replies'], ARGV[3], MAX_REPLIES) end
if ARGV[4] ~= '' then
  rec['relay_id'] = ARGV[4]
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[5])
end
if ARGV[6] ~= '' then rec['reason'] = ARGV[6] end
for address, state in pairs(cjson.decode(ARGV[7])) do rec['recipients'][address] = state end
save(KEYS[1], rec, ARGV[5])
return 1
