"""What the Redis catalog runs inside Redis (its Lua scripts) and the encodings the scripts
and `redis.RedisCatalog` share (packed digests, chunk metadata, expiry scores).

`KEYS` of every script are `RedisCatalog.keys(tenant)`: one tenant's catalog keys, in the
order of `KEY_NAMES` (KEYS[1] is `windows`, KEYS[5] `refs`, ...). See `redis`'s module
docstring for the key layout and why collection claims chunks before deleting their bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cwm_client import pb
from cwm_server.manager.catalog.base import ChunkRow, NewChunk

KEY_NAMES = (
    "windows",
    "basic",
    "wchunks",
    "names",
    "refs",
    "meta",
    "expiry",
    "epoch",
    "freed",
    "dying",
    "floor",
)

_LUA_COMMON = """
local function live(name, now)
  if redis.call('HEXISTS', KEYS[1], name) == 0 then return false end
  local e = redis.call('ZSCORE', KEYS[7], name)
  if e and tonumber(e) <= now then return false end
  return true
end
local function counts_of(packed)
  local counts, order = {}, {}
  for i = 1, #packed, 32 do
    local d = string.sub(packed, i, i + 31)
    if not counts[d] then counts[d] = 0; order[#order + 1] = d end
    counts[d] = counts[d] + 1
  end
  return counts, order
end
local function drop(name)
  local packed = redis.call('HGET', KEYS[3], name)
  redis.call('HDEL', KEYS[1], name)
  redis.call('HDEL', KEYS[2], name)
  redis.call('HDEL', KEYS[3], name)
  redis.call('ZREM', KEYS[4], name)
  redis.call('ZREM', KEYS[7], name)
  local freed = {}
  if not packed then return freed end
  local counts, order = counts_of(packed)
  for _, d in ipairs(order) do
    local n = redis.call('HINCRBY', KEYS[5], d, -counts[d])
    if n <= 0 then
      redis.call('HDEL', KEYS[5], d)
      local m = redis.call('HGET', KEYS[6], d) or ''
      redis.call('HDEL', KEYS[6], d)
      freed[#freed + 1] = d
      freed[#freed + 1] = m
    end
  end
  return freed
end
local function insert(name, full, basic, packed, expires)
  redis.call('HSET', KEYS[1], name, full)
  redis.call('HSET', KEYS[2], name, basic)
  redis.call('HSET', KEYS[3], name, packed)
  redis.call('ZADD', KEYS[4], 0, name)
  if expires ~= '' then redis.call('ZADD', KEYS[7], expires, name) end
end
"""

# ARGV: now, replace, epoch, name, full, basic, packed, expires, then (digest, count, meta)*
COMMIT = (
    _LUA_COMMON
    + """
local now = tonumber(ARGV[1])
local name = ARGV[4]
if live(name, now) and ARGV[2] ~= '1' then return {'EXISTS'} end
local e1 = tonumber(ARGV[3])
if e1 < tonumber(redis.call('GET', KEYS[11]) or '0') then return {'RETRY'} end
local n = (#ARGV - 8) / 3
for i = 0, n - 1 do
  local d = ARGV[9 + 3 * i]
  if redis.call('HEXISTS', KEYS[5], d) == 0 then
    if redis.call('HEXISTS', KEYS[10], d) == 1 then return {'RETRY'} end
    local fe = redis.call('ZSCORE', KEYS[9], d)
    if fe and tonumber(fe) > e1 then return {'RETRY'} end
    if ARGV[11 + 3 * i] == '' then return {'GONE', d} end
  end
end
for i = 0, n - 1 do
  local d = ARGV[9 + 3 * i]
  local c = tonumber(ARGV[10 + 3 * i])
  if redis.call('HINCRBY', KEYS[5], d, c) == c then
    redis.call('HSET', KEYS[6], d, ARGV[11 + 3 * i])
  end
end
local freed = {}
if redis.call('HEXISTS', KEYS[1], name) == 1 then freed = drop(name) end
insert(name, ARGV[5], ARGV[6], ARGV[7], ARGV[8])
local out = {'OK'}
for _, v in ipairs(freed) do out[#out + 1] = v end
return out
"""
)

# ARGV: now, source, name, full, basic, packed (the source's chunks as read), expires
CLONE = (
    _LUA_COMMON
    + """
local now = tonumber(ARGV[1])
local source, name = ARGV[2], ARGV[3]
if live(name, now) then return {'EXISTS'} end
if not live(source, now) then return {'GONE'} end
local packed = redis.call('HGET', KEYS[3], source) or ''
if packed ~= ARGV[6] then return {'CHANGED'} end
local counts, order = counts_of(packed)
for _, d in ipairs(order) do redis.call('HINCRBY', KEYS[5], d, counts[d]) end
local freed = {}
if redis.call('HEXISTS', KEYS[1], name) == 1 then freed = drop(name) end
insert(name, ARGV[4], ARGV[5], packed, ARGV[7])
local out = {'OK'}
for _, v in ipairs(freed) do out[#out + 1] = v end
return out
"""
)

# ARGV: now, name, only_expired
DELETE = (
    _LUA_COMMON
    + """
local now = tonumber(ARGV[1])
local name = ARGV[2]
if ARGV[3] == '1' then
  local e = redis.call('ZSCORE', KEYS[7], name)
  if not e or tonumber(e) > now then return {'NONE'} end
elseif not live(name, now) then
  return {'NONE'}
end
local out = {'OK'}
for _, v in ipairs(drop(name)) do out[#out + 1] = v end
return out
"""
)

# ARGV: digests. Returns epoch, then per digest 0 (row), 1 (no row), 2 (no row, dying).
PREPARE = """
local out = {tonumber(redis.call('GET', KEYS[8]) or '0')}
for i = 1, #ARGV do
  local d = ARGV[i]
  if redis.call('HEXISTS', KEYS[5], d) == 1 then out[#out + 1] = 0
  elseif redis.call('HEXISTS', KEYS[10], d) == 1 then out[#out + 1] = 2
  else out[#out + 1] = 1 end
end
return out
"""

# ARGV: now, kept, stale_before, digests. Claims digests without a row that nobody collects
# (or whose collector stalled before `stale_before`). It starts with a write that cannot grow
# memory (HDEL is not deny-oom): Redis checks `maxmemory` only at a script's first write, so
# a claim (a few bytes) still runs when Redis is full, and the bytes it lets the collector
# delete are what frees Redis (a freeze refused with REDIS_FULL cleans up through it).
CLAIM = """
redis.call('HDEL', KEYS[10], '')
local now, kept, stale = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local claimed = {}
for i = 4, #ARGV do
  local d = ARGV[i]
  if redis.call('HEXISTS', KEYS[5], d) == 0 then
    local since = redis.call('HGET', KEYS[10], d)
    if (not since) or tonumber(since) < stale then
      local e = redis.call('INCR', KEYS[8])
      redis.call('ZADD', KEYS[9], e, d)
      redis.call('HSET', KEYS[10], d, now)
      claimed[#claimed + 1] = d
    end
  end
end
local size = redis.call('ZCARD', KEYS[9])
if size > kept then
  local old = redis.call('ZRANGE', KEYS[9], size - kept - 1, size - kept - 1, 'WITHSCORES')
  redis.call('SET', KEYS[11], old[2])
  redis.call('ZREMRANGEBYRANK', KEYS[9], 0, size - kept - 1)
end
return claimed
"""


def pack_digests(digests: Iterable[bytes]) -> bytes:
    return b"".join(digests)


def chunk_meta(chunk: NewChunk) -> bytes:
    return f"{chunk.raw_size} {chunk.stored_size} {chunk.codec}".encode()


def chunk_row(digest: bytes, refcount: Any, meta: Any) -> ChunkRow | None:
    if refcount is None or meta is None:
        return None
    raw, stored, codec = (int(x) for x in bytes(meta).split())
    return ChunkRow(digest, int(refcount), raw, stored, codec)


def expiry_score(window: pb.WindowInfo) -> str:
    """The expiry index's score: none for a pinned window (it never expires)."""
    if not window.HasField("expires_at") or window.pinned:
        return ""
    return repr(window.expires_at.seconds + window.expires_at.nanos / 1e9)


def is_expired(window: pb.WindowInfo, now: float) -> bool:
    expires = expiry_score(window)
    return bool(expires) and float(expires) <= now
