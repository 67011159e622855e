"""Lua for the limits: each rate-limit admit() and settle(), and each budget reserve() and settle(), is
one EVALSHA, atomic across every worker and replica sharing the Redis.

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

# KEYS: per budget, its spent counter, its holds (a sorted set of "id:units" by expiry) and their sum.
# ARGV: now (UNIX seconds), the amount to hold in 1e-10 USD units, "1" to hold it ("0": only check), the
# hold's member "id:units", its expiry, then per budget its cap in units and its keys' TTL.
# First clears each budget's expired holds, then refuses with {budget index (1-based), spent, held} for
# the first budget already spent or held up to its cap, or that the amount would take past it (the test
# of budgets._over); else holds the amount against every budget. Amounts are compared as Lua doubles
# (exact to 2**53 units, about $900k, and within a few units beyond); the counters change only by
# INCRBY/DECRBY of integer strings, so they stay exact.
BUDGET_RESERVE = """
local now = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local n = #KEYS / 3
for i = 1, n do
  local held, held_units = KEYS[3 * i - 1], KEYS[3 * i]
  local gone = redis.call('ZRANGEBYSCORE', held, '-inf', now)
  if #gone > 0 then
    local total = 0
    for _, member in ipairs(gone) do
      total = total + tonumber(string.match(member, ':(%d+)$'))
    end
    redis.call('ZREMRANGEBYSCORE', held, '-inf', now)
    redis.call('DECRBY', held_units, string.format('%d', total))
  end
  local spent = redis.call('GET', KEYS[3 * i - 2]) or '0'
  local holding = redis.call('GET', held_units) or '0'
  local cap = tonumber(ARGV[4 + 2 * i])
  local used = tonumber(spent) + tonumber(holding)
  if used >= cap or used + amount > cap then
    return {i, spent, holding}
  end
end
if ARGV[3] == '1' then
  for i = 1, n do
    if redis.call('ZADD', KEYS[3 * i - 1], ARGV[5], ARGV[4]) == 1 then
      redis.call('INCRBY', KEYS[3 * i], ARGV[2])
    end
    redis.call('EXPIRE', KEYS[3 * i - 1], ARGV[5 + 2 * i])
    redis.call('EXPIRE', KEYS[3 * i], ARGV[5 + 2 * i])
  end
end
return nil
"""

# KEYS: the spent counters to charge (the day and month counter of each scope), then per budget the
# call held against, its holds and their sum. ARGV: the cost in units ("0": nothing to charge), the
# hold's member ("": none), how many counters to charge, then each one's TTL. The units stay a string:
# INCRBY parses them as a 64-bit integer, where Lua's doubles would round above 2**53 units. A hold
# already cleared as expired is not given back twice.
BUDGET_SETTLE = """
local charged = tonumber(ARGV[3])
if ARGV[1] ~= '0' then
  for i = 1, charged do
    redis.call('INCRBY', KEYS[i], ARGV[1])
    redis.call('EXPIRE', KEYS[i], ARGV[3 + i])
  end
end
if ARGV[2] ~= '' then
  local amount = string.match(ARGV[2], ':(%d+)$')
  for j = charged + 1, #KEYS, 2 do
    if redis.call('ZREM', KEYS[j], ARGV[2]) == 1 then
      redis.call('DECRBY', KEYS[j + 1], amount)
    end
  end
end
return nil
"""
