-- The body of `step(key, argv)`: `claimed` -> `data`, just before the DATA terminator.
-- argv: owner, ledger ttl s, window s. 1 when `claimed` by owner (or lapsed and unclaimed) ->
-- `data`, live for `window` seconds (the longest the attempt waits for the reply).
local cur = redis.call('GET', key)
if cur then
  local rec = cjson.decode(cur)
  if rec['state'] ~= 'claimed' or rec['owner'] ~= argv[1] then return 0 end
end
redis.call('SET', key, record('data', argv[1], '', tonumber(argv[3])), 'EX', argv[2])
return 1
