-- SendGrid events, each once (events/ingest.py; docs/lifecycle.md). An event seen before (its
-- sg_event_id) changes nothing, so SendGrid's retries and duplicates change nothing. One call
-- carries the events of several messages from a drained batch, grouped by message and in the
-- order they came, so each status record is read and written once for all its events; a
-- group with message id '' holds events that name no message of ours (only the seen markers,
-- counts and suppression lists change for those).
-- KEYS: 1 dead letters (hash), 2 dead-letter index; then two per message: status record,
--       ledger record (unused for id ''); then one per event: its seen marker; then the
--       per-minute counts (hashes) and suppression lists (hashes) the events name, each once.
-- ARGV: 1 seen ttl s, 2 status ttl s, 3 counts ttl s, 4 JSON [[message id, [event, ...]], ...]
--       where an event is [type, message state ('' none), event time, recipient ('' none),
--       suppression ('' none, 'add:<reason>' or 'remove'), 1 when the event proves the relay
--       has the message (it resolves an uncertain hold) else 0, its counts key and its
--       suppression key (places among the keys after the seen markers, from 1), the event's
--       summary (an object)].
-- Returns one integer per event, in order: 0 (seen before), 1 (applied), 2 (applied, and an
-- uncertain hold became sent).
local counts = {}
local out = {}

local function count(key, kind)
  local minute = counts[key] or {}
  counts[key] = minute
  minute[kind] = (minute[kind] or 0) + 1
end

-- Suppressions follow the events' own times, not the order they are applied in: the later of
-- an unsubscribe and a resubscribe wins however SendGrid's retries order them.
local function suppress(key, email, directive, at, mid)
  if directive == '' or email == '' then return end
  local raw = redis.call('HGET', key, email)
  local newer = raw and (tonumber(cjson.decode(raw)['at']) or 0) > at
  if directive == 'remove' then
    if raw and not newer then redis.call('HDEL', key, email) end
  elseif not newer then
    local entry = {reason=string.sub(directive, 5), at=at, message_id=mid, source='event'}
    redis.call('HSET', key, email, cjson.encode(entry))
  end
end

-- An event that proves the relay has the message ends an uncertain hold: `sent`, owned by no
-- attempt, so a live attempt's late `uncertain` cannot overwrite it and a redelivered copy is
-- acknowledged as a duplicate; its `uncertain` dead letter goes. Returns 2 when it ended one.
local function resolve(rec, ledger_key, mid, kind, at, ttl)
  local raw = redis.call('GET', ledger_key)
  local led = raw and cjson.decode(raw)
  if not led then return 1 end
  local result = 1
  if led['state'] == 'uncertain' or led['state'] == 'data' then
    local reply = 'resolved by the relay\'s ' .. kind .. ' event'
    local stamp = now()
    redis.call('SET', ledger_key, cjson.encode({state='sent', owner='relay-event', at=stamp,
      reply=reply, ['until']=stamp}), 'EX', ttl)
    push(rec['replies'], reply, MAX_REPLIES)
    enter(rec, 'held', tonumber(led['at']) or at)
    enter(rec, 'sent', at)
    result = 2
  end
  if led['state'] == 'sent' or result == 2 then
    local letter = redis.call('HGET', KEYS[1], mid)
    if letter and cjson.decode(letter)['kind'] == 'uncertain' then
      redis.call('HDEL', KEYS[1], mid)
      redis.call('ZREM', KEYS[2], mid)
      result = 2
    end
  end
  return result
end

local groups = cjson.decode(ARGV[4])
local k = 3 + 2 * #groups     -- the next event's seen marker
local events = 0
for _, group in ipairs(groups) do events = events + #group[2] end
local shared = k + events - 1  -- the counts and suppression keys follow the seen markers
for m, group in ipairs(groups) do
  local mid = group[1]
  local status_key, ledger_key = KEYS[1 + 2 * m], KEYS[2 + 2 * m]
  local rec = nil
  local checked = false
  for _, e in ipairs(group[2]) do
    local result = 0
    if redis.call('SET', KEYS[k], '1', 'NX', 'EX', ARGV[1]) then
      local kind, state, at, email, proof = e[1], e[2], tonumber(e[3]), e[4], e[6]
      count(KEYS[shared + e[7]], kind)
      suppress(KEYS[shared + e[8]], email, e[5], at, mid)
      result = 1
      if mid ~= '' then
        rec = rec or load(status_key)
        enter(rec, state, at)
        if state ~= '' and email ~= '' then
          local mine = rec['recipients'][email]
          if mine == nil or (RANK[state] or -1) >= (RANK[mine] or -1) then
            rec['recipients'][email] = state
          end
        end
        push(rec['events'], e[9], MAX_EVENTS)
        if proof == 1 and not checked then
          checked = true  -- the first proof decides; the message's later ones find it decided
          result = resolve(rec, ledger_key, mid, kind, at, ARGV[2])
        end
      end
    end
    out[#out + 1] = result
    k = k + 1
  end
  if rec then save(status_key, rec, ARGV[2]) end
end
for key, kinds in pairs(counts) do
  for kind, n in pairs(kinds) do redis.call('HINCRBY', key, kind, n) end
  redis.call('EXPIRE', key, ARGV[3])
end
return out
