-- Runs `step` over many records in one call (one EVALSHA per transition and round trip).
-- KEYS: one per call; ARGV: for each call, its argument count, then its arguments. One reply
-- per call, in order: its result (nil sent as false: a nil reply), or its own error, which
-- leaves the others be.
local out = {}
local at = 1
for k = 1, #KEYS do
  local n = tonumber(ARGV[at])
  local ok, result = pcall(step, KEYS[k], {unpack(ARGV, at + 1, at + n)})
  at = at + n + 1
  if not ok then
    if type(result) ~= 'table' then result = {err = tostring(result)} end
  elseif result == nil then
    result = false
  end
  out[k] = result
end
return out
