-- The body of `step(key, argv)`: how our attempt ended.
-- argv: owner, state, reply, ledger ttl s. Records it unless the record has meanwhile become
-- someone else's (never overwrite another attempt's outcome); `sent` is always recorded.
local cur = redis.call('GET', key)
if cur and argv[2] ~= 'sent' then
  local rec = cjson.decode(cur)
  if rec['owner'] ~= argv[1] then return 0 end
end
redis.call('SET', key, record(argv[2], argv[1], argv[3], 0), 'EX', argv[4])
return 1
