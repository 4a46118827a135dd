-- The body of `step(key, argv)` (see ledger.py `_Script`): claim `key` for an attempt.
-- argv: owner, claim ttl ms, takeover ("1": take over `data`/`uncertain`), ledger ttl s, then
-- released owners (earlier attempts of this task that ended certain the relay does not have
-- the message: a leftover `claimed`/`data` record of any of them is free).
-- nil when the claim is ours; otherwise the record that stands in the way. A `data` record
-- still inside its window belongs to a live attempt waiting for the relay's reply: it stands.
-- Past its window, its sender died after starting the terminator: without takeover it becomes
-- `uncertain`.
local cur = redis.call('GET', key)
if cur then
  local rec = cjson.decode(cur)
  local mine = rec['state'] == 'claimed' and rec['owner'] == argv[1]
  local released = false
  if rec['state'] == 'claimed' or rec['state'] == 'data' then
    for i = 5, #argv do
      if rec['owner'] == argv[i] then released = true end
    end
  end
  if not mine and not released then
    if rec['state'] == 'data' and tonumber(rec['until'] or 0) > now() then return cur end
    local ambiguous = rec['state'] == 'data' or rec['state'] == 'uncertain'
    if not (ambiguous and argv[3] == '1') then
      if rec['state'] == 'data' then
        cur = record('uncertain', '', 'its sender died after starting the terminator', 0)
        redis.call('SET', key, cur, 'EX', argv[4])
      end
      return cur
    end
  end
end
redis.call('SET', key, record('claimed', argv[1], '', 0), 'PX', argv[2])
return nil
