"""The Lua scripts of the shared state (policies/redis_quotas.py): each runs atomically in
Redis on the server's clock (TIME), so no gateway's clock and no interleaving matters.
policies/leases.py does the same in plain Python (the fallback, and the tests' reference).

Nothing here refreshes a key's TTL on an increment: a rate bucket's key expires when it would
be full again (a full bucket and a missing one are the same), and every lease carries its own
expiry, reclaimed by the next script that reads its scope.

Keys: rate buckets are hashes {u: taken and not yet refilled, t: microseconds} (what was
taken, not what is left: a limit changed by a reload keeps this minute's use); a lease scope is a sorted set
(lease -> expiry in ms) plus a hash (lease -> amount, and `_total`).
"""

from __future__ import annotations

_NOW = """
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
"""

# rate(mode, keys, sizes_and_amounts): "take" every amount or none ({1, 0} when taken, else
# {0, microseconds to wait}); "settle" adds each amount back (negative: a debt), never above
# the size ({1, 0}). sizes_and_amounts: per key, the size (per minute) then the amount.
_RATE_FN = """
local function rate(mode, keys, pairs)
  local levels = {}
  local wait = 0
  for i = 1, #keys do
    local size = tonumber(pairs[2 * i - 1])
    local amount = tonumber(pairs[2 * i])
    local per_us = size / 60000000
    local held = redis.call('HMGET', keys[i], 'u', 't')
    local level = size
    if held[1] then
      level = size - math.max(0, tonumber(held[1]) - (now_us - tonumber(held[2])) * per_us)
    end
    levels[i] = level
    if mode == 'take' and level < amount then
      wait = math.max(wait, (amount - level) / per_us)
    end
  end
  if wait > 0 then
    return {0, math.ceil(wait)}
  end
  for i = 1, #keys do
    local size = tonumber(pairs[2 * i - 1])
    local amount = tonumber(pairs[2 * i])
    local level
    if mode == 'take' then level = levels[i] - amount else level = math.min(size, levels[i] + amount) end
    redis.call('HSET', keys[i], 'u', tostring(size - level), 't', tostring(now_us))
    redis.call('PEXPIRE', keys[i], math.ceil((size - level) * 60000 / size) + 1000)
  end
  return {1, 0}
end
"""

# KEYS: bucket keys. ARGV: mode ("take" | "settle"), then per key: size, amount.
RATE = _NOW + _RATE_FN + """
return rate(ARGV[1], KEYS, {unpack(ARGV, 2)})
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

# acquire(lease, ttl, keys, limits_and_amounts): keys per scope, its sorted set then its hash;
# per scope its limit then the amount. {0, totals...} when held on every scope, else
# {i, total of scope i} for the first scope i (1-based) it did not fit.
_ACQUIRE_FN = """
local function acquire(lease, ttl, keys, pairs)
  local totals = {}
  for i = 1, #keys / 2 do
    local total = reclaim(keys[2 * i - 1], keys[2 * i])
    local limit = tonumber(pairs[2 * i - 1])
    local amount = tonumber(pairs[2 * i])
    if total + amount > limit then
      return {i, total}
    end
    totals[i] = total + amount
  end
  for i = 1, #keys / 2 do
    local amount = tonumber(pairs[2 * i])
    redis.call('ZADD', keys[2 * i - 1], now_ms + ttl, lease)
    redis.call('HSET', keys[2 * i], lease, amount)
    redis.call('HINCRBY', keys[2 * i], '_total', amount)
  end
  table.insert(totals, 1, 0)
  return totals
end
"""

# release(lease, keys): keys per scope, its sorted set then its hash.
_RELEASE_FN = """
local function release(lease, keys)
  for i = 1, #keys / 2 do
    local z, h = keys[2 * i - 1], keys[2 * i]
    redis.call('ZREM', z, lease)
    local amount = redis.call('HGET', h, lease)
    if amount then
      redis.call('HINCRBY', h, '_total', -tonumber(amount))
      redis.call('HDEL', h, lease)
    end
    if redis.call('ZCARD', z) == 0 then redis.call('DEL', h) end
  end
end
"""

# KEYS: per scope, its sorted set then its hash. ARGV: lease, ttl ms, then per scope: limit,
# amount.
ACQUIRE = _NOW + _RECLAIM + _ACQUIRE_FN + """
return acquire(ARGV[1], tonumber(ARGV[2]), KEYS, {unpack(ARGV, 3)})
"""

# Admission in one round trip: take the rate buckets, then hold the lease. KEYS: the n bucket
# keys, then the scopes' keys. ARGV: n, lease, ttl ms, per bucket: size, amount, then per
# scope: limit, amount. {0, wait} when a bucket is short (nothing taken); else the buckets are
# taken and {1, acquire's answer...} (the lease held, or the scope that did not fit: the
# caller waits for it with ACQUIRE, charged as when it queues).
ADMIT = _NOW + _RECLAIM + _RATE_FN + _ACQUIRE_FN + """
local n = tonumber(ARGV[1])
local bucket_keys, scope_keys = {}, {}
for i = 1, #KEYS do
  if i <= n then table.insert(bucket_keys, KEYS[i]) else table.insert(scope_keys, KEYS[i]) end
end
local taken = rate('take', bucket_keys, {unpack(ARGV, 4, 3 + 2 * n)})
if taken[1] == 0 then
  return taken
end
if #scope_keys == 0 then
  return {1, 0}
end
local held = acquire(ARGV[2], tonumber(ARGV[3]), scope_keys, {unpack(ARGV, 4 + 2 * n)})
table.insert(held, 1, 1)
return held
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
RELEASE = _RELEASE_FN + """
release(ARGV[1], KEYS)
return 1
"""

# The end of a request in one round trip: release the lease and settle the buckets. KEYS: the
# n bucket keys, then the scopes' keys. ARGV: n, lease, per bucket: size, amount.
FINISH = _NOW + _RATE_FN + _RELEASE_FN + """
local n = tonumber(ARGV[1])
local bucket_keys, scope_keys = {}, {}
for i = 1, #KEYS do
  if i <= n then table.insert(bucket_keys, KEYS[i]) else table.insert(scope_keys, KEYS[i]) end
end
release(ARGV[2], scope_keys)
if n > 0 then rate('settle', bucket_keys, {unpack(ARGV, 3)}) end
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

# ---- spend budgets (policies/budget.py) ----------------------------------------------------
# A tenant's period is a hash {spent, reserved, exposure: integer nano-units of the price;
# c:<id>: "reserved,worst" of each request in flight}, a sorted set of those requests' leases
# (id -> expiry ms: a gateway that dies stops renewing, and its reservations are reclaimed by
# the next reserve) and a sorted set of the ids settled in the last hour (a retried settle is
# a no-op). Every key expires by itself (ARGV's period ttl: the period's end plus a margin).

_BUDGET_RECLAIM = """
local function unreserve(h, id)
  local c = redis.call('HGET', h, 'c:' .. id)
  if not c then return end
  local comma = string.find(c, ',')
  local r, w = tonumber(string.sub(c, 1, comma - 1)), tonumber(string.sub(c, comma + 1))
  redis.call('HINCRBY', h, 'reserved', -r)
  redis.call('HINCRBY', h, 'exposure', r - w)
  redis.call('HDEL', h, 'c:' .. id)
end
local function reclaim(h, z)
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', now_ms)
  for _, id in ipairs(gone) do
    unreserve(h, id)
    redis.call('ZREM', z, id)
  end
end
"""

# KEYS: the period's hash, its leases. ARGV: id, amount, estimate, worst, lease ttl ms, period
# ttl ms. Admitted when the worst case of everything in flight plus this request's fits what is
# left: {1, spent, reserved, exposure} (reserving the estimate; the rest of its worst case is
# exposure), else {0, spent, reserved, exposure}. The same id twice: admitted once.
BUDGET_RESERVE = _NOW + _BUDGET_RECLAIM + """
local h, z, id = KEYS[1], KEYS[2], ARGV[1]
reclaim(h, z)
local held = redis.call('HMGET', h, 'spent', 'reserved', 'exposure')
local spent, reserved, exposure = tonumber(held[1] or '0'), tonumber(held[2] or '0'), tonumber(held[3] or '0')
if redis.call('HEXISTS', h, 'c:' .. id) == 1 then
  return {1, spent, reserved, exposure}
end
local amount, est, worst = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if amount - spent - reserved - exposure < worst then
  return {0, spent, reserved, exposure}
end
redis.call('HINCRBY', h, 'reserved', est)
redis.call('HINCRBY', h, 'exposure', worst - est)
redis.call('HSET', h, 'c:' .. id, est .. ',' .. worst)
redis.call('ZADD', z, now_ms + tonumber(ARGV[5]), id)
redis.call('PEXPIRE', h, tonumber(ARGV[6]))
redis.call('PEXPIRE', z, tonumber(ARGV[6]))
return {1, spent, reserved + est, exposure + worst - est}
"""

# KEYS: the period's hash, its leases, its settled ids. ARGV: id, actual, period ttl ms.
# Drops the reservation and adds the actual cost to `spent`, once per id: 1, or 0 for an id
# settled already.
BUDGET_SETTLE = _NOW + _BUDGET_RECLAIM + """
local h, z, s, id = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
if redis.call('ZSCORE', s, id) then return 0 end
unreserve(h, id)
redis.call('ZREM', z, id)
redis.call('HINCRBY', h, 'spent', tonumber(ARGV[2]))
redis.call('ZADD', s, now_ms, id)
redis.call('ZREMRANGEBYSCORE', s, '-inf', now_ms - 3600000)
redis.call('PEXPIRE', h, tonumber(ARGV[3]))
redis.call('PEXPIRE', s, tonumber(ARGV[3]))
return 1
"""

# KEYS: the period's hash, its leases. Reclaims expired leases; {spent, reserved, exposure}.
BUDGET_READ = _NOW + _BUDGET_RECLAIM + """
reclaim(KEYS[1], KEYS[2])
local held = redis.call('HMGET', KEYS[1], 'spent', 'reserved', 'exposure')
return {tonumber(held[1] or '0'), tonumber(held[2] or '0'), tonumber(held[3] or '0')}
"""

# ---- fair share (policies/fair_share.py) ---------------------------------------------------
# KEYS[1]: the counters' hash. ARGV: ttl ms, then pairs tenant, delta. Adds every delta,
# refreshes the expiry, answers every counter (HGETALL).
FAIR_ADD = """
for i = 2, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
end
if #ARGV > 1 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1])) end
return redis.call('HGETALL', KEYS[1])
"""
