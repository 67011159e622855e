"""Lua for the limits: each rate-limit admit() and settle(), and each budget charge(), is one EVALSHA,
atomic across every worker and replica sharing the Redis.

Every key a script touches is passed in KEYS, as Redis requires; in a Redis Cluster the keys of one
call would have to share a slot, which per-scope keys do not, so the limits need a single primary
(with replicas or Sentinel).

Rate limits: each (scope, minute) is one hash with fields r (requests) and t (tokens). The admission
test, `previous * weight + current + cost > cap`, is the same expression in the same order as
ratelimit._exceeds, so the in-process and Redis limiters agree to the last bit of a double.
"""

# KEYS: per limit, its current-minute hash then its previous-minute hash.
# ARGV: weight of the previous minute, tokens, key TTL, then per limit its rpm and tpm (-1: no cap).
# Returns nil when admitted and counted, else {limit index (1-based), kind (1 requests, 2 tokens), cap,
# previous-minute count, current-minute count} for the first cap the request would exceed.
ADMIT = """
local weight = tonumber(ARGV[1])
local costs = {1, tonumber(ARGV[2])}
for i = 1, #KEYS / 2 do
  local cur = redis.call('HMGET', KEYS[2 * i - 1], 'r', 't')
  local prev = redis.call('HMGET', KEYS[2 * i], 'r', 't')
  for kind = 1, 2 do
    local cap = tonumber(ARGV[3 + 2 * (i - 1) + kind])
    if cap >= 0 then
      local c = tonumber(cur[kind]) or 0
      local p = tonumber(prev[kind]) or 0
      if p * weight + c + costs[kind] > cap then
        return {i, kind, cap, p, c}
      end
    end
  end
end
for i = 1, #KEYS, 2 do
  redis.call('HINCRBY', KEYS[i], 'r', 1)
  redis.call('HINCRBY', KEYS[i], 't', ARGV[2])
  redis.call('EXPIRE', KEYS[i], ARGV[3])
end
return nil
"""

# KEYS: as ADMIT. ARGV: token delta (actual - estimate, non-zero), key TTL.
# A refund drains the current minute, then the previous one, because the reservation was made in
# the previous minute when the call straddled the turn of the minute; no count goes below zero.
SETTLE = """
local delta = tonumber(ARGV[1])
for i = 1, #KEYS, 2 do
  if delta > 0 then
    redis.call('HINCRBY', KEYS[i], 't', ARGV[1])
    redis.call('EXPIRE', KEYS[i], ARGV[2])
  else
    local owed = -delta
    for j = i, i + 1 do
      local take = math.min(tonumber(redis.call('HGET', KEYS[j], 't')) or 0, owed)
      if take > 0 then
        redis.call('HINCRBY', KEYS[j], 't', -take)
        owed = owed - take
      end
    end
  end
end
return nil
"""

# KEYS: the day and month counters of each scope. ARGV: the cost in 1e-10 USD units, then each key's
# TTL. The units stay a string: INCRBY parses them as a 64-bit integer, where Lua's doubles would
# round above 2**53 units.
CHARGE = """
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, ARGV[1])
  redis.call('EXPIRE', key, ARGV[i + 1])
end
return nil
"""
