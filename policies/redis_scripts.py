"""The Lua scripts of the shared state (policies/shared_state.py): each runs atomically in
Redis on the server's clock (TIME), so no gateway's clock and no interleaving matters.
policies/leases.py does the same in plain Python (the fallback, and the tests' reference).

Nothing here refreshes a key's TTL on an increment: a rate bucket's key expires when it would
be full again (a full bucket and a missing one are the same), and every lease carries its own
expiry, reclaimed by the next script that reads its scope.

Keys: rate buckets are hashes {l: level, t: microseconds}; a lease scope is a sorted set
(lease -> expiry in ms) plus a hash (lease -> amount, and `_total`).
"""

from __future__ import annotations

_NOW = """
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
"""

# KEYS: bucket keys. ARGV: mode ("take" | "settle"), then per key: size (per minute), amount.
# take: every amount or none; returns {1, 0} when taken, else {0, microseconds to wait}.
# settle: adds each amount back (negative: a debt), never above the size; returns {1, 0}.
RATE = _NOW + """
local mode = ARGV[1]
local levels = {}
local wait = 0
for i = 1, #KEYS do
  local size = tonumber(ARGV[2 * i])
  local amount = tonumber(ARGV[2 * i + 1])
  local per_us = size / 60000000
  local held = redis.call('HMGET', KEYS[i], 'l', 't')
  local level = size
  if held[1] then
    level = math.min(size, tonumber(held[1]) + (now_us - tonumber(held[2])) * per_us)
  end
  levels[i] = level
  if mode == 'take' and level < amount then
    wait = math.max(wait, (amount - level) / per_us)
  end
end
if wait > 0 then
  return {0, math.ceil(wait)}
end
for i = 1, #KEYS do
  local size = tonumber(ARGV[2 * i])
  local amount = tonumber(ARGV[2 * i + 1])
  local level
  if mode == 'take' then level = levels[i] - amount else level = math.min(size, levels[i] + amount) end
  redis.call('HSET', KEYS[i], 'l', tostring(level), 't', tostring(now_us))
  local full_ms = math.ceil((size - level) * 60000 / size) + 1000
  redis.call('PEXPIRE', KEYS[i], full_ms)
end
return {1, 0}
"""

_RECLAIM = """
local function reclaim(z, h)
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', now_ms)
  for _, lease in ipairs(gone) do
    local amount = redis.call('HGET', h, lease)
    if amount then
      redis.call('HINCRBY', h, '_total', -tonumber(amount))
      redis.call('HDEL', h, lease)
    end
    redis.call('ZREM', z, lease)
  end
  if redis.call('ZCARD', z) == 0 then redis.call('DEL', h) end
  return tonumber(redis.call('HGET', h, '_total') or '0')
end
"""

# KEYS: per scope, its sorted set then its hash. ARGV: lease, ttl ms, then per scope: limit,
# amount. Returns {0, totals...} when held on every scope, else {i, total of scope i} for
# the first scope i (1-based) it did not fit.
ACQUIRE = _NOW + _RECLAIM + """
local lease = ARGV[1]
local ttl = tonumber(ARGV[2])
local totals = {}
for i = 1, #KEYS / 2 do
  local total = reclaim(KEYS[2 * i - 1], KEYS[2 * i])
  local limit = tonumber(ARGV[1 + 2 * i])
  local amount = tonumber(ARGV[2 + 2 * i])
  if total + amount > limit then
    return {i, total}
  end
  totals[i] = total + amount
end
for i = 1, #KEYS / 2 do
  local amount = tonumber(ARGV[2 + 2 * i])
  redis.call('ZADD', KEYS[2 * i - 1], now_ms + ttl, lease)
  redis.call('HSET', KEYS[2 * i], lease, amount)
  redis.call('HINCRBY', KEYS[2 * i], '_total', amount)
end
table.insert(totals, 1, 0)
return totals
"""

# KEYS: sorted sets of the lease's scopes. ARGV: lease, ttl ms. Moves the expiry of a lease
# still held (XX: never adds one back); returns on how many scopes it was held.
RENEW = _NOW + """
local renewed = 0
for i = 1, #KEYS do
  if redis.call('ZSCORE', KEYS[i], ARGV[1]) then
    redis.call('ZADD', KEYS[i], 'XX', now_ms + tonumber(ARGV[2]), ARGV[1])
    renewed = renewed + 1
  end
end
return renewed
"""

# KEYS: per scope, its sorted set then its hash. ARGV: lease.
RELEASE = """
for i = 1, #KEYS / 2 do
  local z, h = KEYS[2 * i - 1], KEYS[2 * i]
  redis.call('ZREM', z, ARGV[1])
  local amount = redis.call('HGET', h, ARGV[1])
  if amount then
    redis.call('HINCRBY', h, '_total', -tonumber(amount))
    redis.call('HDEL', h, ARGV[1])
  end
  if redis.call('ZCARD', z) == 0 then redis.call('DEL', h) end
end
return 1
"""

# KEYS: the set of live gateway processes. ARGV: this process's id, ttl ms, "1" to leave.
# Returns how many processes are live (their heartbeat not older than the ttl).
HEARTBEAT = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
end
return redis.call('ZCARD', KEYS[1])
"""
