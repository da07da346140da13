"""The Lua scripts of the redis store (:mod:`fastim.store.redis`), one per operation.

Each script is one atomic step in Redis: the channel scripts (``APPEND``, ``READ``,
``RESTART_EPOCH``) share a prelude that reads a channel's meta hash and starts a new epoch
when the channel is new or its stream was lost; the inbox scripts (``INBOX_*``) keep a
user's sequence numbers, acknowledgements and dedup keys. The key layout they work on is
described in :mod:`fastim.store.redis`. ``SCRIPTS`` names them for the store, each with
its SHA-1 for ``EVALSHA``. This module needs nothing but the standard library.
"""

from __future__ import annotations

import hashlib

# The channel scripts share this prelude: read the meta hash, detect a lost stream, create
# the channel (new epoch) when needed. KEYS[1] meta, KEYS[2] stream; ARGV[1] a fresh epoch
# ('': do not create, return {'', 0} instead), ARGV[2] meta_ttl ms (0 = none). Sets
# `epoch`, `top`, `last` (time of the last append), `created`, `now` (ms).
_CHANNEL_PRELUDE = """
local meta, stream = KEYS[1], KEYS[2]
local mttl = tonumber(ARGV[2])
local m = redis.call('HMGET', meta, 'epoch', 'top', 'ts')
local epoch, top, last = m[1], 0, tonumber(m[3] or '0')
local created = false
if epoch then
  top = tonumber(m[2])
  if top > 0 and redis.call('EXISTS', stream) == 0 then epoch = false end
end
if not epoch then
  if ARGV[1] == '' then return {'', 0} end  -- a peek: a read that creates nothing
  epoch = ARGV[1]
  top = 0
  created = true
  redis.call('DEL', stream)
  redis.call('DEL', meta)
  redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
  if mttl > 0 then redis.call('PEXPIRE', meta, mttl) end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# The body of both appends, after the prelude and `size`, `ttl`, `n` (messages to store):
# XADD them (MSG(i): the i-th, an expression), trim by count and age, set the expiries.
# Sets `first` (the first new offset) and `top`.
_APPEND_BODY = """local first = top + 1
if n > 0 then
  if not created and last > now then now = last end  -- time never goes back in a channel
  for i = 1, n do
    redis.call('XADD', stream, (top + i) .. '-0', 't', now, 'd', MSG(i))
  end
  top = top + n
  redis.call('HSET', meta, 'top', top, 'ts', now)
  redis.call('XTRIM', stream, 'MINID', '~', math.max(0, top - size + 1))
  if ttl > 0 then
    -- expired entries are a prefix: find the first live one, drop what is before it
    local cutoff = now - ttl
    local from = '-'
    for _ = 1, 16 do
      local es = redis.call('XRANGE', stream, from, '+', 'COUNT', 64)
      local live = nil
      for _, e in ipairs(es) do
        if tonumber(e[2][2]) > cutoff then live = e[1] break end
      end
      if live then
        redis.call('XTRIM', stream, 'MINID', live)
        break
      end
      if #es == 0 then break end
      from = '(' .. es[#es][1]
      redis.call('XTRIM', stream, 'MINID', from:sub(2))
    end
  end
  if mttl > 0 then
    redis.call('PEXPIRE', meta, mttl)
    redis.call('PEXPIRE', stream, mttl)
  else
    redis.call('PERSIST', meta)
    redis.call('PERSIST', stream)
  end
end
"""

# ARGV[3] size, ARGV[4] ttl ms (0 = none), ARGV[5..] the messages. Returns {first, epoch}.
APPEND = (
    _CHANNEL_PRELUDE
    + """
local size, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local n = #ARGV - 4
"""
    + _APPEND_BODY.replace("MSG(i)", "ARGV[4 + i]")
    + """return {first, epoch}
"""
)

# Store.append_keyed. KEYS[3] the channel's idempotency keys (hash: key -> "<epoch> <offset>
# <expiry ms>"), KEYS[4] the same keys scored by expiry (to forget them). ARGV[3] size,
# ARGV[4] ttl ms, ARGV[5] window ms (0 = record nothing), ARGV[6] the count c, ARGV[7 ..
# 6+c] each message's key ('' = none), ARGV[7+c .. 6+2c] the messages. A key recorded in
# the current epoch and not expired is a repeat: not stored, answered with its offset (as
# is a key repeated in the batch). Returns {first, epoch, offset1, dup1, offset2, ...}.
APPEND_KEYED = (
    _CHANNEL_PRELUDE
    + """
local size, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local hkeys, times = KEYS[3], KEYS[4]
local window, total = tonumber(ARGV[5]), tonumber(ARGV[6])
local old = redis.call('ZRANGEBYSCORE', times, '-inf', now, 'LIMIT', 0, 100)
if #old > 0 then
  redis.call('HDEL', hkeys, unpack(old))
  redis.call('ZREM', times, unpack(old))
end
local n, fresh, offs, dups, firstpos, record = 0, {}, {}, {}, {}, {}
for i = 1, total do
  local k = ARGV[6 + i]
  local off = nil
  if k ~= '' then
    local j = firstpos[k]
    if j then
      off = offs[j]
    else
      firstpos[k] = i
      local v = redis.call('HGET', hkeys, k)
      if v then
        local e, o, x = string.match(v, '^(%S+) (%d+) (%d+)$')
        if e == epoch and tonumber(x) > now then off = tonumber(o) end
      end
    end
  end
  if off then
    offs[i], dups[i] = off, 1
  else
    n = n + 1
    fresh[n] = ARGV[6 + total + i]
    offs[i], dups[i] = top + n, 0
    if k ~= '' then record[#record + 1] = i end
  end
end
"""
    + _APPEND_BODY.replace("MSG(i)", "fresh[i]")
    + """if window > 0 and #record > 0 then
  local expires = now + window
  for _, i in ipairs(record) do
    local k = ARGV[6 + i]
    redis.call('HSET', hkeys, k, epoch .. ' ' .. offs[i] .. ' ' .. expires)
    redis.call('ZADD', times, expires, k)
  end
  redis.call('PEXPIRE', hkeys, window)
  redis.call('PEXPIRE', times, window)
end
local out = {first, epoch}
for i = 1, total do
  out[#out + 1] = offs[i]
  out[#out + 1] = dups[i]
end
return out
"""
)

# ARGV[3] the epoch the caller saw, ARGV[4] another fresh epoch. Returns {epoch, top}: a new
# epoch when the channel was still in the one seen (compare-and-set: one restart wins).
RESTART_EPOCH = (
    _CHANNEL_PRELUDE
    + """
if not created and epoch == ARGV[3] then
  epoch = ARGV[4]
  redis.call('HSET', meta, 'epoch', epoch)
end
return {epoch, top}
"""
)

# ARGV[3] since, ARGV[4] limit, ARGV[5] size, ARGV[6] ttl ms. Returns {epoch, top, off, data, ...}.
READ = (
    _CHANNEL_PRELUDE
    + """
local out = {epoch, top}
local limit = tonumber(ARGV[4])
if created or limit == 0 or top == 0 then return out end
local since, size, ttl = tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6])
local cutoff = -1
if ttl > 0 then cutoff = now - ttl end
local from = tostring(math.max(since, top - size) + 1)
local got = 0
while got < limit do
  local es = redis.call('XRANGE', stream, from, '+', 'COUNT', limit - got)
  if #es == 0 then break end
  for _, e in ipairs(es) do
    if tonumber(e[2][2]) > cutoff then
      out[#out + 1] = tonumber(string.match(e[1], '^%d+'))
      out[#out + 1] = e[2][4]
      got = got + 1
    end
  end
  from = '(' .. es[#es][1]
end
return out
"""
)

# KEYS meta, stream, dedup, times. ARGV: data, dedup key ('' = none), has sender ('0'/'1'),
# sender, msg id, max unacked, dedup window ms, a fresh epoch. Returns {seq, msg_id,
# duplicate, epoch} or {-1, '', 0, epoch} when full. An inbox without its meta hash (never
# written, or lost: a flushed or evicted Redis) starts again at 1 in the fresh epoch.
INBOX_APPEND = """
local meta, stream, dedup, times = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local key, window = ARGV[2], tonumber(ARGV[7])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', meta) == 0 then
  redis.call('DEL', stream, dedup, times)  -- leftovers of a lost inbox would clash
end
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[8]
  redis.call('HSET', meta, 'epoch', epoch)
end
if key ~= '' then
  local old = redis.call('ZRANGEBYSCORE', times, '-inf', now - window, 'LIMIT', 0, 100)
  if #old > 0 then
    redis.call('HDEL', dedup, unpack(old))
    redis.call('ZREM', times, unpack(old))
  end
  local hit = redis.call('HGET', dedup, key)
  if hit then
    local seq, mid, ts = string.match(hit, '^(%d+) (%S+) (%d+)$')
    if now - tonumber(ts) < window then return {tonumber(seq), mid, 1, epoch} end
  end
end
local top = tonumber(redis.call('HGET', meta, 'top') or '0')
local acked = tonumber(redis.call('HGET', meta, 'acked') or '0')
if top - acked >= tonumber(ARGV[6]) then return {-1, '', 0, epoch} end
top = top + 1
redis.call('HSET', meta, 'top', top, 'acked', acked)
if ARGV[3] == '1' then
  redis.call('XADD', stream, top .. '-0', 'i', ARGV[5], 's', ARGV[4], 'd', ARGV[1])
else
  redis.call('XADD', stream, top .. '-0', 'i', ARGV[5], 'd', ARGV[1])
end
if key ~= '' and window > 0 then
  redis.call('HSET', dedup, key, top .. ' ' .. ARGV[5] .. ' ' .. now)
  redis.call('ZADD', times, now, key)
end
return {top, ARGV[5], 0, epoch}
"""

# KEYS meta, stream. ARGV seq, has epoch ('0'/'1'), epoch. Returns {acked, top, refused
# (0/1), epoch}; an ack naming another epoch than the inbox's changes nothing.
INBOX_ACK = """
local top = tonumber(redis.call('HGET', KEYS[1], 'top') or '0')
local acked = tonumber(redis.call('HGET', KEYS[1], 'acked') or '0')
local epoch = redis.call('HGET', KEYS[1], 'epoch') or ''
local seq = tonumber(ARGV[1])
if ARGV[2] == '1' and ARGV[3] ~= epoch then return {acked, top, 0, epoch} end
if seq > top then return {acked, top, 1, epoch} end
if seq > acked then
  acked = seq
  redis.call('HSET', KEYS[1], 'acked', acked)
  redis.call('XTRIM', KEYS[2], 'MINID', acked + 1)
end
return {acked, top, 0, epoch}
"""

# KEYS meta. ARGV the epoch seen, a fresh one. Returns {acked, top, epoch}.
INBOX_RESTART_EPOCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, ''} end
local top = tonumber(redis.call('HGET', KEYS[1], 'top') or '0')
local acked = tonumber(redis.call('HGET', KEYS[1], 'acked') or '0')
local epoch = redis.call('HGET', KEYS[1], 'epoch') or ''
if epoch == ARGV[1] then
  epoch = ARGV[2]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
return {acked, top, epoch}
"""

# KEYS meta, stream. ARGV after, limit. Returns {acked, top, epoch, seq, id, sender|false,
# data, ...}.
INBOX_READ = """
local acked = tonumber(redis.call('HGET', KEYS[1], 'acked') or '0')
local top = tonumber(redis.call('HGET', KEYS[1], 'top') or '0')
local out = {acked, top, redis.call('HGET', KEYS[1], 'epoch') or ''}
local limit = tonumber(ARGV[2])
if limit == 0 or top == 0 then return out end
local from = math.max(tonumber(ARGV[1]), acked) + 1
local es = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', limit)
for _, e in ipairs(es) do
  local f = e[2]
  local id, sender, data = nil, false, nil
  for j = 1, #f, 2 do
    if f[j] == 'i' then id = f[j + 1] elseif f[j] == 's' then sender = f[j + 1]
    elseif f[j] == 'd' then data = f[j + 1] end
  end
  out[#out + 1] = tonumber(string.match(e[1], '^%d+'))
  out[#out + 1] = id
  out[#out + 1] = sender
  out[#out + 1] = data
end
return out
"""


class Script:
    """One Lua script: its source and the SHA-1 that ``EVALSHA`` names it by."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


# ---- the event outbox (fastim.backend, docs/events.md). KEYS[1] is the outbox's base
# key ``P:ev:{o}``; its keys are that base plus ``:s`` (stream of events, ``d`` field),
# ``:lease`` (sender lease), ``:n`` (zset node -> beat expiry ms), ``:an`` (set of nodes
# with armed events), ``:akey`` (hash armed key -> node), ``:a:<node>`` (hash armed key ->
# "<ord> <seq> <lost event>"), ``:seq`` (counter). All share the ``{o}`` hash tag, so the
# scripts build the per-node names themselves (one slot in a Redis Cluster).
_OUTBOX_NOW = """
local b = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# ARGV: 6 per event: data, arm key ('' none), arm node, arm ord, arm lost, disarm key.
# Returns the number of events added.
OUTBOX_ADD = (
    _OUTBOX_NOW
    + """
local n = 0
for i = 1, #ARGV, 6 do
  local ok = true
  local dk = ARGV[i + 5]
  if dk ~= '' then
    local node = redis.call('HGET', b .. ':akey', dk)
    if node then
      redis.call('HDEL', b .. ':a:' .. node, dk)
      redis.call('HDEL', b .. ':akey', dk)
    else
      ok = false  -- claimed as lost: that event went out already
    end
  end
  if ok then
    local ak = ARGV[i + 1]
    if ak ~= '' then
      local node = ARGV[i + 2]
      local seq = redis.call('INCR', b .. ':seq')
      redis.call('HSET', b .. ':a:' .. node, ak, ARGV[i + 3] .. ' ' .. seq .. ' ' .. ARGV[i + 4])
      redis.call('HSET', b .. ':akey', ak, node)
      redis.call('SADD', b .. ':an', node)
    end
    if ARGV[i] ~= '' then  -- '': bookkeeping only
      redis.call('XADD', b .. ':s', '*', 'd', ARGV[i])
      n = n + 1
    end
  end
end
return n
"""
)

# ARGV[1] limit. Returns XRANGE's reply.
OUTBOX_READ = """
return redis.call('XRANGE', KEYS[1] .. ':s', '-', '+', 'COUNT', ARGV[1])
"""

# ARGV: stream ids to delete.
OUTBOX_REMOVE = """
if #ARGV == 0 then return 0 end
return redis.call('XDEL', KEYS[1] .. ':s', unpack(ARGV))
"""

# Returns {depth, id of the oldest ('' none), armed}.
OUTBOX_STATS = """
local b = KEYS[1]
local first = redis.call('XRANGE', b .. ':s', '-', '+', 'COUNT', 1)
local id = ''
if first[1] then id = first[1][1] end
return {redis.call('XLEN', b .. ':s'), id, redis.call('HLEN', b .. ':akey')}
"""

# ARGV[1] owner, ARGV[2] ttl ms (0: release). Returns 1 if the owner holds the lease.
OUTBOX_LEASE = """
local k = KEYS[1] .. ':lease'
local cur = redis.call('GET', k)
if cur and cur ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) <= 0 then
  if cur then redis.call('DEL', k) end
  return 0
end
redis.call('SET', k, ARGV[1], 'PX', ARGV[2])
return 1
"""

# ARGV[1] node, ARGV[2] ttl ms.
OUTBOX_BEAT = (
    _OUTBOX_NOW
    + """
redis.call('ZADD', b .. ':n', now + tonumber(ARGV[2]), ARGV[1])
return 1
"""
)

# ARGV[1] limit. Emits the armed events of nodes whose beat expired (or never came),
# leaves before disconnects (ord), then in arming order. Returns how many.
OUTBOX_CLAIM = (
    _OUTBOX_NOW
    + """
local left = tonumber(ARGV[1])
local n = 0
local tail = ',"time":' .. now .. '}'
for _, node in ipairs(redis.call('SMEMBERS', b .. ':an')) do
  local exp = redis.call('ZSCORE', b .. ':n', node)
  if left > 0 and (not exp or tonumber(exp) <= now) then
    local h = b .. ':a:' .. node
    local all = redis.call('HGETALL', h)
    local rows = {}
    for i = 1, #all, 2 do
      local o, s, lost = string.match(all[i + 1], '^(%-?%d+) (%d+) (.*)$')
      rows[#rows + 1] = {tonumber(o), tonumber(s), all[i], lost}
    end
    table.sort(rows, function(x, y)
      if x[1] ~= y[1] then return x[1] < y[1] end
      return x[2] < y[2]
    end)
    local take = math.min(#rows, left)
    for i = 1, take do
      local r = rows[i]
      redis.call('XADD', b .. ':s', '*', 'd', r[4] .. tail)
      redis.call('HDEL', h, r[3])
      redis.call('HDEL', b .. ':akey', r[3])
    end
    n = n + take
    left = left - take
    if take == #rows then
      redis.call('SREM', b .. ':an', node)
      redis.call('ZREM', b .. ':n', node)
    end
  end
end
redis.call('ZREMRANGEBYSCORE', b .. ':n', '-inf', now - 3600000)
return n
"""
)

SCRIPTS = {
    name: Script(src)
    for name, src in (
        ("append", APPEND),
        ("append_keyed", APPEND_KEYED),
        ("read", READ),
        ("restart_epoch", RESTART_EPOCH),
        ("inbox_append", INBOX_APPEND),
        ("inbox_ack", INBOX_ACK),
        ("inbox_read", INBOX_READ),
        ("inbox_restart_epoch", INBOX_RESTART_EPOCH),
        ("outbox_add", OUTBOX_ADD),
        ("outbox_read", OUTBOX_READ),
        ("outbox_remove", OUTBOX_REMOVE),
        ("outbox_stats", OUTBOX_STATS),
        ("outbox_lease", OUTBOX_LEASE),
        ("outbox_beat", OUTBOX_BEAT),
        ("outbox_claim", OUTBOX_CLAIM),
    )
}
