-- One SendGrid event, once (events/ingest.py; docs/lifecycle.md). Nothing happens for an event
-- seen before (its sg_event_id), so SendGrid's retries and duplicates change nothing.
-- KEYS: 1 seen marker, 2 status record, 3 per-minute counts, 4 suppression hash, 5 ledger
--       record, 6 dead letters (hash), 7 dead-letter index; 2, 4-7 are only used as ARGV says.
-- ARGV: 1 seen ttl s, 2 status ttl s, 3 event type, 4 message state ('' none), 5 event time,
--       6 event summary JSON, 7 recipient, 8 suppression: '' none, 'add:<reason>' or 'remove',
--       9 '1': the event proves the relay has the message (resolves an uncertain hold),
--       10 counts ttl s, 11 '1': correlated to a message, 12 message id.
-- Returns 0 (seen before), 1 (applied), 2 (applied, and an uncertain hold became sent).
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
redis.call('EXPIRE', KEYS[3], ARGV[10])
local at = tonumber(ARGV[5])
if ARGV[8] == 'remove' then
  redis.call('HDEL', KEYS[4], ARGV[7])
elseif ARGV[8] ~= '' then
  local entry = {reason=string.sub(ARGV[8], 5), at=at, message_id=ARGV[12], source='event'}
  redis.call('HSET', KEYS[4], ARGV[7], cjson.encode(entry))
end
if ARGV[11] ~= '1' then return 1 end
local rec = load(KEYS[2])
enter(rec, ARGV[4], at)
if ARGV[4] ~= '' and ARGV[7] ~= '' then
  local mine = rec['recipients'][ARGV[7]]
  if mine == nil or (RANK[ARGV[4]] or -1) >= (RANK[mine] or -1) then
    rec['recipients'][ARGV[7]] = ARGV[4]
  end
end
push(rec['events'], cjson.decode(ARGV[6]), MAX_EVENTS)
local resolved = 1
if ARGV[9] == '1' then
  local raw = redis.call('GET', KEYS[5])
  local led = raw and cjson.decode(raw)
  if led and (led['state'] == 'uncertain' or led['state'] == 'data') then
    -- The relay has it: `sent`, owned by no attempt, so a live attempt's late `uncertain`
    -- cannot overwrite it and a redelivered copy is acknowledged as a duplicate.
    local reply = 'resolved by the relay\'s ' .. ARGV[3] .. ' event'
    local stamp = now()
    redis.call('SET', KEYS[5], cjson.encode({state='sent', owner='relay-event', at=stamp,
      reply=reply, ['until']=stamp}), 'EX', ARGV[2])
    push(rec['replies'], reply, MAX_REPLIES)
    enter(rec, 'held', tonumber(led['at']) or at)
    enter(rec, 'sent', at)
    resolved = 2
  end
  if (led and (led['state'] == 'sent' or resolved == 2)) then
    local letter = redis.call('HGET', KEYS[6], ARGV[12])
    if letter and cjson.decode(letter)['kind'] == 'uncertain' then
      redis.call('HDEL', KEYS[6], ARGV[12])
      redis.call('ZREM', KEYS[7], ARGV[12])
      resolved = 2
    end
  end
end
save(KEYS[2], rec, ARGV[2])
return resolved
