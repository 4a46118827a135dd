-- The lease semaphore's acquire (workers/state/semaphore.py, docs/semaphore.md). Atomic, on
-- Redis' clock.
-- KEYS: holders_1, meta_1, ..., holders_n, meta_n, wanted_1..wanted_n, epoch, quarantine,
-- waiting. ARGV: id, ttl_ms, host, pid, new_epoch, grace_ms, cap_1..cap_n. Returns
-- {1, ttl_ms, epoch} on success, else {0, ms until the earliest expiry among the full limits or
-- the end of the quarantine (-1 if unknown), epoch}. A full limit is marked wanted for a TTL,
-- which renewals report to holders so they stop keeping idle connections (see
-- LeaseSemaphore.contended), and the process is noted in `waiting` (see lease_release.lua).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local n = (#KEYS - 3) / 3
local id = ARGV[1]
local expiry = now + tonumber(ARGV[2])
local ekey, qkey = KEYS[#KEYS - 2], KEYS[#KEYS - 1]
local quarantine = redis.call('PTTL', qkey)
if quarantine > 0 then
  return {0, quarantine, redis.call('GET', ekey) or ''}
end
-- A replica promoted by a failover may lack the newest leases (replication is asynchronous)
-- while their holders stay connected until a renewal tells them: grant nothing for a TTL, by
-- which time each of them has fenced itself. Promoted: its previous replication id is the
-- primary's we last saw (`{epoch}:primary`; a restart or a first start is not a failover).
local pkey = ekey .. ':primary'
local repl = redis.call('INFO', 'replication')
local replid = string.match(repl, 'master_replid:(%w+)')
local known = redis.call('GET', pkey)
if replid and known ~= replid then
  redis.call('SET', pkey, replid)
  if known and known == string.match(repl, 'master_replid2:(%w+)') then
    redis.call('SET', qkey, replid, 'PX', ARGV[2])
    return {0, tonumber(ARGV[2]), redis.call('GET', ekey) or ''}
  end
end
local epoch = redis.call('GET', ekey)
if not epoch then
  epoch = ARGV[5]
  redis.call('SET', ekey, epoch)
  local grace = tonumber(ARGV[6])
  if grace > 0 then
    -- No epoch: a first start, or a restart that lost everything. Without AOF, and started
    -- less than grace ago, holders of forgotten leases may still be connected: wait them out.
    local info = redis.call('INFO', 'persistence') .. redis.call('INFO', 'server')
    local aof = string.match(info, 'aof_enabled:(%d)')
    local up = tonumber(string.match(info, 'uptime_in_seconds:(%d+)'))
    if aof == '0' and up and up * 1000 < grace then
      local wait = grace - up * 1000
      redis.call('SET', qkey, epoch, 'PX', wait)
      return {0, wait, epoch}
    end
  end
end
for i = 1, n do
  local h, m = KEYS[2 * i - 1], KEYS[2 * i]
  local expired = redis.call('ZRANGEBYSCORE', h, '-inf', now)
  if #expired > 0 then
    for j = 1, #expired, 1000 do
      redis.call('HDEL', m, unpack(expired, j, math.min(j + 999, #expired)))
    end
    redis.call('ZREMRANGEBYSCORE', h, '-inf', now)
  end
end
-- A retry of an attempt whose reply was lost: the lease is already ours, just extend it.
if redis.call('ZSCORE', KEYS[1], id) then
  for i = 1, n do
    redis.call('ZADD', KEYS[2 * i - 1], 'XX', 'GT', expiry, id)
  end
  return {1, tonumber(ARGV[2]), epoch}
end
local wait = -1
local full = false
for i = 1, n do
  local h = KEYS[2 * i - 1]
  if redis.call('ZCARD', h) >= tonumber(ARGV[6 + i]) then
    full = true
    redis.call('SET', KEYS[2 * n + i], now, 'PX', ARGV[2])
    local first = redis.call('ZRANGE', h, 0, 0, 'WITHSCORES')
    if #first > 0 then
      wait = math.max(wait, tonumber(first[2]) - now)
    end
  end
end
if full then
  redis.call('ZADD', KEYS[#KEYS], now, ARGV[3] .. ':' .. ARGV[4])
  return {0, wait, epoch}
end
local meta = cjson.encode({host = ARGV[3], pid = tonumber(ARGV[4]), acquired_ms = now})
for i = 1, n do
  redis.call('ZADD', KEYS[2 * i - 1], expiry, id)
  redis.call('HSET', KEYS[2 * i], id, meta)
end
return {1, tonumber(ARGV[2]), epoch}
