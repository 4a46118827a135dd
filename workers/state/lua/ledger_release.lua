-- The body of `step(key, argv)`: forget our attempt.
-- argv: owner. Deletes our own `claimed` or `data` record: the caller knows the relay does not
-- have the message (it never got the terminator, or answered it with a 4xx/421).
local cur = redis.call('GET', key)
if not cur then return 0 end
local rec = cjson.decode(cur)
if (rec['state'] == 'claimed' or rec['state'] == 'data') and rec['owner'] == argv[1] then
  return redis.call('DEL', key)
end
return 0
