-- The lease semaphore's renewal of many leases at once (workers/state/keeper.py).
-- KEYS: holders/meta pairs, wanted_1..wanted_n, epoch. ARGV: ttl_ms, id_1, epoch_1, id_2, ...
-- Returns {current epoch or false, ms the fleet stays contended (<= 0: not), lost ids...}.
-- A lease is extended only if it is still unexpired in every limit and its epoch is current:
-- an expired lease may already belong to someone else, so it is never resurrected.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local n = (#KEYS - 1) / 3
local expiry = now + tonumber(ARGV[1])
local epoch = redis.call('GET', KEYS[#KEYS])
local wanted = -2
for i = 1, n do
  wanted = math.max(wanted, redis.call('PTTL', KEYS[2 * n + i]))
end
local out = {epoch, wanted}
for j = 2, #ARGV, 2 do
  local id = ARGV[j]
  local alive = epoch and epoch == ARGV[j + 1]
  if alive then
    for i = 1, n do
      local s = redis.call('ZSCORE', KEYS[2 * i - 1], id)
      if not s or tonumber(s) <= now then
        alive = false
        break
      end
    end
  end
  if alive then
    for i = 1, n do
      redis.call('ZADD', KEYS[2 * i - 1], 'XX', 'GT', expiry, id)
    end
  else
    out[#out + 1] = id
  end
end
return out
