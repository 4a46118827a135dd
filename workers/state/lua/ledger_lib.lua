-- The ledger's shared functions (workers/state/ledger.py, docs/ledger.md): Redis time in
-- seconds, and a record as JSON.
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function record(state, owner, reply, window)
  local at = now()
  return cjson.encode({state=state, owner=owner, at=at, reply=reply, ['until']=at + window})
end
