-- The fleet's message rate (workers/state/ratelimit.py, docs/shaping.md): GCRA on Redis time.
--
-- KEYS[1]: the state hash. Its fields:
--   w:<window>       a window's theoretical arrival time (TAT), seconds
--   c0 t0 step cmax  the adaptive ceiling: c0 msg/s at t0, growing `step` msg/s per second,
--                    dropped once it reaches cmax; `reason`, `at` describe the last decrease
--   a:<lane>         the adaptive window's TAT (per lane: a lane's share of the ceiling)
--   gs gc gp         granted: the second of `gc`, granted in it, granted in the second before
--   ts tc tp         throttling replies, counted the same way
--   ss sd            slow start: the ceiling in force while the fleet knows nothing of the
--                    relay yet (ss, msg/s), and that it is over for good (sd)
--   cs ca            the cycle: when it began (the first grant, or the last restore) and the
--                    tokens the relay accepted since (granted - throttled): its long-run rate
--   pd rr pl pr      a probe: since pd the ceiling is a trickle of probes; rr is the rate to
--                    restore; pl, pr: how long a refusal is long, the recovery
--
-- ARGV[1] is the operation:
--   take  want horizon burst_s lane share late n (field T tau)*n ss_start ss_gain ss_max ss_for
--         Grants up to `want` tokens: token j of the grant conforms to window i at
--         start_i + j*T_i - tau_i, and only tokens conforming within `horizon` seconds are
--         granted, so a grant is a slice of every window's schedule, never a burst beyond tau.
--         `share` scales the adaptive ceiling for the lane (1 = the whole ceiling); the
--         ceiling's tolerance (burst_s of its rate, at least one token) is `late` seconds
--         smaller, as the caller's tau are: it may use a token up to `late` after its time.
--         Slow start (ss_start > 0: no window configured): while nothing is known of the relay
--         (no ceiling, no slow start before) the ceiling starts at ss_start msg/s and grows by
--         ss_gain msg/s per token granted (e-fold per second while the fleet uses it all), to
--         at most twice the fleet's granted rate, until the first throttling reply, or until
--         it reaches ss_max or has lasted ss_for seconds, when it is over.
--         Returns {granted, wait, ceiling, state, (offset_i, T_i)...} as strings: token j may
--         be used offset_i + j*T_i seconds from now on window i (the latest of them); `wait`
--         is when to ask again after a refusal; `state` is '1' while the ceiling is slow
--         start's, 'p' while it is a probe's.
--   count n          n tokens used without asking (no window configured): for the measure.
--   throttle n floor cooldown recovery reason cap probe long probe_max
--         n throttling replies seen. At most once per `cooldown`: the ceiling falls to what the
--         relay accepted in the last second (granted - throttled), between 0.6 and 0.95 of
--         the rate the fleet sends, never below `floor`; it then grows by `recovery` of the
--         rate it fell from per second until `cap` (0: twice that rate), when it is dropped.
--         Without a measure of the fleet's rate (nothing granted or counted lately) it only
--         counts. Two cases say nothing yet of the relay's rate: the first throttling reply
--         of slow start, and a relay that accepted under a tenth of what it was granted (a
--         spent budget, or a rate far exceeded). Both start a probe: the ceiling falls at
--         once to `probe` of the rate it would fall to (at least `floor`, at most
--         `probe_max`), halving each
--         cooldown while the relay refuses everything, until a worker reports a probe
--         delivered (`accept`). The ceiling is then restored: to the rate it would have fallen to if the refusals lasted less than
--         `long` seconds (a per-second limit), else to the cycle's long-run accepted rate (a
--         budget per minute or hour, spent early: its reset is the next cycle), growing then
--         by `recovery` of that rate per cycle length, not per second (a budget a little
--         faster each second would be spent early again).
--   accept           a message admitted during a probe was delivered: the ceiling is restored.
--   peek             {ceiling or '', reason, at}
local key = KEYS[1]
local op = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local sec = tonumber(t[1])

-- Adds n to this second's count of `prefix`; returns the last full second's count, this
-- second's count scaled to a whole second (a rate either way), and this second's count.
local function roll(prefix, n)
  local s = tonumber(redis.call('HGET', key, prefix .. 's') or 0)
  local c = tonumber(redis.call('HGET', key, prefix .. 'c') or 0)
  local p = tonumber(redis.call('HGET', key, prefix .. 'p') or 0)
  if s == sec then
    c = c + n
  elseif s == sec - 1 then
    p, c = c, n
  else
    p, c = 0, n
  end
  redis.call('HSET', key, prefix .. 's', sec, prefix .. 'c', c, prefix .. 'p', p)
  return p, c / math.max(0.25, now - sec), c
end

local function drop_lanes()
  local fields = redis.call('HKEYS', key)
  for _, f in ipairs(fields) do
    if string.sub(f, 1, 2) == 'a:' then redis.call('HDEL', key, f) end
  end
end

-- The ceiling in force (msg/s) or nil, and whether it is slow start's.
local function ceiling()
  local c = redis.call('HMGET', key, 'c0', 't0', 'step', 'cmax', 'ss')
  if not c[1] then
    if c[5] then return tonumber(c[5]), true end
    return nil, false
  end
  local rate = tonumber(c[1]) + math.max(0, now - tonumber(c[2])) * tonumber(c[3])
  if rate >= tonumber(c[4]) then
    drop_lanes()
    redis.call('HDEL', key, 'c0', 't0', 'step', 'cmax')
    return nil, false
  end
  return rate, false
end

-- What the ceiling in force is: '1' slow start's, 'p' a probe's, '' a measured rate's.
local function state()
  if redis.call('HEXISTS', key, 'pd') == 1 then return 'p' end
  if redis.call('HEXISTS', key, 'ss') == 1 and redis.call('HEXISTS', key, 'c0') == 0 then
    return '1'
  end
  return ''
end

-- The cycle's accepted count: n tokens granted (or, negative, refused).
local function cycle(n)
  if redis.call('HEXISTS', key, 'cs') == 0 then
    redis.call('HSET', key, 'cs', now, 'ca', 0)
  end
  redis.call('HINCRBY', key, 'ca', n)  -- whole tokens (and in the documented ACL rule)
end

-- A probe went through: the relay takes mail again. The ceiling is restored and a new cycle
-- begins.
local function restore()
  local p = redis.call('HMGET', key, 'pd', 'rr', 'pl', 'pr', 'cs', 'ca', 'c0')
  if not p[1] then return end
  local target = tonumber(p[2])
  local step = target * tonumber(p[4])
  if now - tonumber(p[1]) >= tonumber(p[3]) then
    -- A long refusal: the rate of the second before it says nothing (a budget spent early
    -- in its window); the cycle's does.
    local span = math.max(1, now - tonumber(p[5] or now))
    target = math.max(0, tonumber(p[6] or 0)) / span
    step = target * tonumber(p[4]) / span
  end
  target = math.max(target, tonumber(p[7] or 0))
  drop_lanes()  -- the probe's spacing would hold the first grants at the trickle
  redis.call('HDEL', key, 'pd', 'rr', 'pl', 'pr')
  redis.call('HSET', key, 'c0', target, 't0', now, 'step', step, 'cs', now, 'ca', 0, 'at', now)
end

local result
if op == 'take' then
  local want = tonumber(ARGV[2])
  local horizon = tonumber(ARGV[3])
  local burst_s = tonumber(ARGV[4])
  local lane = ARGV[5]
  local share = tonumber(ARGV[6])
  local late = tonumber(ARGV[7])
  local n = tonumber(ARGV[8])
  local windows = {}
  for i = 0, n - 1 do
    windows[#windows + 1] = {ARGV[9 + 3 * i], tonumber(ARGV[10 + 3 * i]), tonumber(ARGV[11 + 3 * i])}
  end
  local ss_at = 9 + 3 * n
  local ss_start = tonumber(ARGV[ss_at] or 0)
  local ss_gain, ss_max = tonumber(ARGV[ss_at + 1] or 0), tonumber(ARGV[ss_at + 2] or 0)
  local ss_for = tonumber(ARGV[ss_at + 3] or 0)
  if ss_start > 0 and redis.call('HEXISTS', key, 'sd') == 0
      and redis.call('HEXISTS', key, 'ss') == 0 and redis.call('HEXISTS', key, 'c0') == 0 then
    redis.call('HSET', key, 'ss', ss_start, 'reason', 'slow start', 'at', now)
  elseif ss_for > 0 and redis.call('HEXISTS', key, 'ss') == 1
      and now - tonumber(redis.call('HGET', key, 'at') or now) >= ss_for then
    -- Lasted its time without a throttling reply: the relay takes what this fleet sends.
    drop_lanes()
    redis.call('HDEL', key, 'ss')
    redis.call('HSET', key, 'sd', 1)
  end
  local rate, slow = ceiling()
  if rate then
    local lane_rate = math.max(rate * share, 0.001)
    local tau = math.max(1, lane_rate * burst_s) / lane_rate
    windows[#windows + 1] = {'a:' .. lane, 1 / lane_rate, math.max(0, tau - late)}
  end
  local k = want
  local starts = {}
  local wait = 0
  for i, w in ipairs(windows) do
    local start = math.max(tonumber(redis.call('HGET', key, w[1]) or 0), now)
    starts[i] = start
    local fit = math.floor((now + horizon + w[3] - start) / w[2])
    if fit < k then k = fit end
    wait = math.max(wait, start + w[2] - w[3] - now - horizon)
  end
  if k < 0 then k = 0 end
  result = {tostring(k), tostring(wait), rate and tostring(rate) or '', state()}
  if k > 0 then
    for i, w in ipairs(windows) do
      redis.call('HSET', key, w[1], starts[i] + k * w[2])
      result[#result + 1] = tostring(starts[i] - w[3] - now)
      result[#result + 1] = tostring(w[2])
    end
    local gp, gc = roll('g', k)
    cycle(k)
    if slow then
      -- Grows with use, to at most twice what the fleet was granted in the last second: a
      -- ceiling far above what the fleet can send would not slow it when the relay refuses.
      local grown = math.min(rate + ss_gain * k, math.max(rate, 2 * math.max(gp, gc)))
      if ss_max > 0 and grown >= ss_max then
        drop_lanes()
        redis.call('HDEL', key, 'ss')
        redis.call('HSET', key, 'sd', 1)
      else
        redis.call('HSET', key, 'ss', grown)
      end
    end
  end
elseif op == 'count' then
  roll('g', tonumber(ARGV[2]))
  cycle(tonumber(ARGV[2]))
  local rate = ceiling()
  result = {rate and tostring(rate) or ''}
elseif op == 'throttle' then
  local n, floor, cooldown = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local recovery, reason, cap = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
  local probe, long, probe_max = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
  -- Counted, not scaled up: a second's first moments scaled to a whole second overstate it.
  local tp, _, tc = roll('t', n)
  local gp, _, gc = roll('g', 0)
  cycle(-n)
  local throttled, granted = math.max(tp, tc), math.max(gp, gc)
  local last = tonumber(redis.call('HGET', key, 'd') or 0)
  local rate, slow = ceiling()
  local probing = redis.call('HEXISTS', key, 'pd') == 1
  -- No decrease without a measure of what we send: a ceiling guessed from nothing could
  -- only be wrong (the counts of the next report say what the fleet sends).
  if probing then
    if now - last >= cooldown and granted > 0 and granted - throttled < 0.1 * granted then
      -- Still refused: probe half as often.
      rate = math.max(floor, rate * 0.5)
      redis.call('HSET', key, 'c0', rate, 't0', now, 'd', now, 'reason', reason, 'at', now)
    end
  elseif (now - last >= cooldown or slow) and (rate or granted > 0) then
    local current = rate or granted
    local sending = math.min(current, math.max(granted, 1))
    local accepted = granted - throttled
    local target = math.max(sending * 0.6, math.min(sending * 0.95, accepted))
    local start_probe = slow or accepted < 0.1 * granted
    if slow then redis.call('HDEL', key, 'ss') end
    -- Recovered (and dropped) at the configured rate, or, with none, at twice the rate the
    -- first decrease of this episode fell from: a later decrease keeps that point, or a
    -- ceiling at the floor would lift after a few seconds and let the fleet burst again.
    local top = cap
    if top <= 0 then
      top = tonumber(redis.call('HGET', key, 'cmax') or 0)
      if not rate or top <= 0 or slow then top = 2 * current end
    end
    target = math.max(floor, target)
    top = math.max(top, target * 1.05)
    if start_probe then
      -- The relay's rate is not known yet: a trickle of probes until one goes through.
      redis.call('HSET', key, 'pd', now, 'rr', target, 'pl', long, 'pr', recovery)
      target = math.max(floor, math.min(target * probe, probe_max))
    end
    redis.call('HSET', key, 'c0', target, 't0', now, 'step', start_probe and 0 or current * recovery,
      'cmax', top, 'd', now, 'reason', reason, 'at', now, 'sd', 1)
    rate = target
  end
  result = {rate and tostring(rate) or '', state()}
elseif op == 'accept' then
  restore()
  local rate = ceiling()
  result = {rate and tostring(rate) or '', state()}
else
  local rate = ceiling()
  local info = redis.call('HMGET', key, 'reason', 'at')
  result = {rate and tostring(rate) or '', info[1] or '', info[2] or ''}
end
redis.call('EXPIRE', key, 172800)
return result
