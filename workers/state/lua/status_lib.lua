-- A message's status record (mailer/lifecycle.py reads it; docs/lifecycle.md): JSON
-- {state, at, transitions = [[state, at], ...], replies, relay_id, recipients = {address:
-- state}, events, reason}. The current state is the highest-ranked one entered (the latest of
-- equal rank): events arrive out of order, and a message's news only gets further.
local RANK = {scheduled=0, queued=0, held=1, failed=1, suppressed=1, cancelled=1, sent=2,
  deferred=3, delivered=4, bounced=5, dropped=5, blocked=5, spamreport=6, unsubscribed=6}
local MAX_REPLIES = 10
local MAX_EVENTS = 20
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function load(key)
  local raw = redis.call('GET', key)
  local rec = raw and cjson.decode(raw) or {}
  rec['state'] = rec['state'] or ''
  rec['at'] = rec['at'] or 0
  -- cjson writes an empty list as {} and reads it back as a table: both are fine here.
  rec['transitions'] = rec['transitions'] or {}
  rec['replies'] = rec['replies'] or {}
  rec['events'] = rec['events'] or {}
  rec['recipients'] = rec['recipients'] or {}
  return rec
end
local function push(list, item, most)
  table.insert(list, item)
  while #list > most do table.remove(list, 1) end
end
local function enter(rec, state, at)
  if state == '' then return end
  local seen = false
  for _, t in ipairs(rec['transitions']) do
    if t[1] == state then seen = true end
  end
  if not seen then table.insert(rec['transitions'], {state, at}) end
  local cur, new = RANK[rec['state']] or -1, RANK[state] or -1
  if new > cur or (new == cur and at >= rec['at']) then
    rec['state'] = state
    rec['at'] = at
  end
end
local function save(key, rec, ttl)
  if next(rec['recipients']) == nil then rec['recipients'] = nil end
  redis.call('SET', key, cjson.encode(rec), 'EX', ttl)
end
