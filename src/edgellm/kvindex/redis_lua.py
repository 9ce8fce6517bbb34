"""The Lua library every script of the Redis backend starts with (``redis_scripts.py``).

It keeps the memory backend's rules (``memory_lru.py``: rows, leaves, recency, touches)
over the key layout of ``redis_keys.py``. Two things make it fast and small:

- *Compact encodings.* Engine and prefix hashes are 8 raw bytes, big-endian (so that byte
  order is numeric order: leaf ties break on the engine hash, as in memory). A row is
  ``prefix(8) .. ('P' .. parent(8) | 'R') .. "eff,children"``; a prefix's holders are a
  trimmed bitmap of the pods' slots in the shard (2 bytes for one holder). Slots are
  reused lowest first (``<shard>:free``), as in memory, so bitmaps stay short (up to
  2048 pods per shard).
- *Small hashes.* A shard's prefix table (prefix -> holders, ``x``) is split into buckets
  by linear hashing, each bucket a hash of ~32 fields: Redis keeps such hashes as
  listpacks (field and value bytes plus ~2 bytes each, where a hashtable entry costs ~60
  bytes more); a lookup in a bucket scans it (~0.3 us). A new table starts with as many
  buckets as its budget fills to ~32 fields each, up to 2^16 (buckets nobody uses do not
  exist; a table far below its budget pays ~100 bytes per bucket key it spreads over), so
  splitting - one bucket per growth step, never a rehash of the whole table - only
  happens past that. The state ``"level,split,count"`` is a field of
  ``<shard>:ls``; scripts cache it and write it back once (:func:`flush`). A pod's rows
  (``e:<slot>``) are one hash: an event's rows are read with one HMGET and written with
  one HSET, which saves more time than buckets would save bytes.

``ARGV[1]`` of every script is ``G``, the *scope* of the block budget, the clock (tick),
the leaf queue and the counters: the namespace on one Redis (one budget over every
context, exactly as in memory), the shard itself in Redis Cluster (a script may only
touch its own slot there, so each shard keeps its own budget; ``redis_keys.py``).
"""

from __future__ import annotations

__all__ = ["COMMON"]

COMMON = r"""
local G = ARGV[1]
local sbyte, ssub, smatch, sfind, sformat = string.byte, string.sub, string.match,
  string.find, string.format
local XLOAD = 32
local XL0 = 0  -- the level a new prefix table starts at (BATCH sizes it for its budget)
local ST = {}

local function h32(k)
  local e, f, g, h = sbyte(k, 5, 8)
  return ((e * 256 + f) * 256 + g) * 256 + h
end

-- The linear-hashing state of table `name` of shard S:
-- {level, split, count, dirty, bucket key prefix, name, S, 2^level, count that splits}.
local function state(S, name)
  local id = S .. '|' .. name
  local st = ST[id]
  if not st then
    local raw = redis.call('HMGET', S .. ':ls', name)[1]
    local L, sp, n = XL0, 0, 0
    if raw then
      L, sp, n = smatch(raw, '^(%d+),(%d+),(%d+)$')
      L, sp, n = tonumber(L), tonumber(sp), tonumber(n)
    end
    st = {L, sp, n, false, S .. ':' .. name .. ':', name, S, 2 ^ L, XLOAD * (2 ^ L + sp)}
    ST[id] = st
  end
  return st
end
-- A bucket's key: the table's prefix and the bucket number as 3 raw bytes (formatting a
-- number costs a lookup twice as much).
local schar = string.char
local function bname(a)
  return schar(a % 256, (a - a % 256) / 256 % 256, (a - a % 65536) / 65536 % 256)
end
local function bucket(st, k)
  local e, f, g, h = sbyte(k, 5, 8)
  local v = ((e * 256 + f) * 256 + g) * 256 + h  -- the low 32 bits (xxh64: uniform)
  local a = v % st[8]
  if a < st[2] then a = v % (2 * st[8]) end
  return st[5] .. bname(a)
end
local function split(st)
  local m = 2 ^ st[1]
  local from = st[5] .. bname(st[2])
  local flat = redis.call('HGETALL', from)
  local moved, gone = {}, {}
  for i = 1, #flat, 2 do
    if h32(flat[i]) % (2 * m) ~= st[2] then
      moved[#moved + 1] = flat[i]
      moved[#moved + 1] = flat[i + 1]
      gone[#gone + 1] = flat[i]
    end
  end
  if #gone > 0 then
    redis.call('HSET', st[5] .. bname(st[2] + m), unpack(moved))
    redis.call('HDEL', from, unpack(gone))
  end
  st[2] = st[2] + 1
  if st[2] == m then st[1] = st[1] + 1; st[2] = 0; st[8] = 2 * m end
  st[9] = XLOAD * (st[8] + st[2])
end
local function tget(st, k) return redis.call('HGET', bucket(st, k), k) end
local function tset(st, k, v)
  if redis.call('HSET', bucket(st, k), k, v) == 1 then
    st[3] = st[3] + 1
    st[4] = true
    if st[3] > st[9] then split(st) end
  end
end
local function tdel(st, k)
  if redis.call('HDEL', bucket(st, k), k) == 1 then st[3] = st[3] - 1; st[4] = true end
end
-- (Lua's unpack takes ~8000 values: long lists go in chunks.)
local function hmget(k, fields)
  if #fields <= 4000 then return redis.call('HMGET', k, unpack(fields)) end
  local out = {}
  for at = 1, #fields, 4000 do
    local part = redis.call('HMGET', k, unpack(fields, at, math.min(at + 3999, #fields)))
    for i = 1, #part do out[#out + 1] = part[i] end
  end
  return out
end
local function hset(k, flat)
  for at = 1, #flat, 4000 do redis.call('HSET', k, unpack(flat, at, math.min(at + 3999, #flat))) end
end
-- The table is gone.
local function tdrop(st)
  local keys = {}
  if st[3] > 0 then
    for a = 0, 2 ^ st[1] + st[2] - 1 do
      keys[#keys + 1] = st[5] .. bname(a)
      if #keys == 512 then redis.call('UNLINK', unpack(keys)); keys = {} end
    end
  end
  if #keys > 0 then redis.call('UNLINK', unpack(keys)) end
  st[1], st[2], st[3], st[4], st[8], st[9] = XL0, 0, 0, true, 2 ^ XL0, XLOAD * 2 ^ XL0
end
-- The scope's block count, read once and written back by flush().
local BLOCKS, BLOCKS_DIRTY = nil, false
local function blocks()
  if not BLOCKS then BLOCKS = tonumber(redis.call('HGET', G .. ':n', 'blocks') or '0') end
  return BLOCKS
end
local function blocks_add(d)
  BLOCKS = blocks() + d
  BLOCKS_DIRTY = true
end
local function flush()
  if BLOCKS_DIRTY then
    redis.call('HSET', G .. ':n', 'blocks', sformat('%d', BLOCKS))
    BLOCKS_DIRTY = false
  end
  for _, st in pairs(ST) do
    if st[4] then
      if st[3] == 0 then
        -- Empty buckets are gone (Redis deletes empty hashes): start over at one bucket.
        redis.call('HDEL', st[7] .. ':ls', st[6])
        st[1], st[2], st[8], st[9] = XL0, 0, 2 ^ XL0, XLOAD * 2 ^ XL0
      else
        redis.call('HSET', st[7] .. ':ls', st[6], sformat('%d,%d,%d', st[1], st[2], st[3]))
      end
      st[4] = false
    end
  end
end

local function xs(S) return state(S, 'x') end
-- Whether a key exists, asked once per script: a pod's touches and prefixes held twice
-- are often absent, and then each row skips a look there.
local HAS = {}
local function has(k)
  local v = HAS[k]
  if v == nil then
    v = redis.call('EXISTS', k) == 1
    HAS[k] = v
  end
  return v
end
-- A pod's rows: one hash (listpack while small, a hashtable beyond): an event's rows are
-- read and written with one HMGET and one HSET, which matters more than their size.
local function ek(S, slot) return S .. ':e:' .. slot end
local function eget(k, e) return redis.call('HGET', k, e) end
local function eset(k, e, v) redis.call('HSET', k, e, v) end

-- Rows: prefix(8) .. ('P' .. parent(8) | 'R') .. "eff,children"; parent '' for none.
local function parse(v)
  if sbyte(v, 9) == 80 then
    local eff, ch = smatch(v, '^(%d+),(%d+)$', 18)
    return ssub(v, 1, 8), ssub(v, 10, 17), tonumber(eff), tonumber(ch)
  end
  local eff, ch = smatch(v, '^(%d+),(%d+)$', 10)
  return ssub(v, 1, 8), '', tonumber(eff), tonumber(ch)
end
local function fmt(p, par, eff, ch)
  if par == '' then return p .. 'R' .. sformat('%d,%d', eff, ch) end
  return p .. 'P' .. par .. sformat('%d,%d', eff, ch)
end

-- Leaf queue members: engine(8) .. shard .. '|' .. slot, in G's queue and the shard's.
local function member(S, slot, e) return e .. S .. '|' .. slot end
local function leaf_add(S, slot, e, eff)
  local m = member(S, slot, e)
  redis.call('ZADD', G .. ':lv', eff, m)
  if S ~= G then redis.call('ZADD', S .. ':lv', eff, m) end
end
local function leaf_rem(S, slot, e)
  local m = member(S, slot, e)
  redis.call('ZREM', G .. ':lv', m)
  if S ~= G then redis.call('ZREM', S .. ':lv', m) end
end
local function effective(S, slot, p, eff)
  local tk = S .. ':t:' .. slot
  if not has(tk) then return eff end
  local t = redis.call('HGET', tk, p)
  if t and tonumber(t) > eff then return tonumber(t) end
  return eff
end
-- Holders of a prefix: a bitmap of slots, trimmed: char(first byte index) .. the bytes
-- from there to the last non-zero one (slot 8*i + b is bit b of byte i). One holder costs
-- 2 bytes; slots are reused, lowest first, so bitmaps stay short.
local band, bor, bnot, lshift = bit.band, bit.bor, bit.bnot, bit.lshift
local srep, floor = string.rep, math.floor
local function own_bits(slot)
  local n = tonumber(slot)
  return schar(floor(n / 8), lshift(1, n % 8))
end
-- v with slot's bit set, or nil if it was set already.
local function bits_add(v, slot)
  local n = tonumber(slot)
  local i, m = floor(n / 8), lshift(1, n % 8)
  local first = sbyte(v, 1)
  local last = first + #v - 2
  if i < first then return schar(i, m) .. srep('\0', first - i - 1) .. ssub(v, 2) end
  if i > last then return v .. srep('\0', i - last - 1) .. schar(m) end
  local at = i - first + 2
  local old = sbyte(v, at)
  if band(old, m) ~= 0 then return nil end
  return ssub(v, 1, at - 1) .. schar(bor(old, m)) .. ssub(v, at + 1)
end
-- v with slot's bit cleared ('' once no bit is left), or nil if it was not set.
local function bits_del(v, slot)
  local n = tonumber(slot)
  local i, m = floor(n / 8), lshift(1, n % 8)
  local first = sbyte(v, 1)
  local at = i - first + 2
  if at < 2 or at > #v then return nil end
  local old = sbyte(v, at)
  if band(old, m) == 0 then return nil end
  local bytes = {sbyte(v, 2, #v)}
  bytes[at - 1] = band(old, bnot(m))
  local lo, hi = 1, #bytes
  while lo <= hi and bytes[lo] == 0 do lo = lo + 1 end
  while hi >= lo and bytes[hi] == 0 do hi = hi - 1 end
  if lo > hi then return '' end
  return schar(first + lo - 1, unpack(bytes, lo, hi))
end
-- The pod (slot) holds prefix p once more.
local function hold_key(S, slot, p, x, bits)
  x = x or xs(S)
  local b = bucket(x, p)
  if redis.call('HSETNX', b, p, bits or own_bits(slot)) == 1 then  -- nobody held it yet
    x[3] = x[3] + 1
    x[4] = true
    if x[3] > x[9] then split(x) end
    return
  end
  local v = bits_add(redis.call('HGET', b, p), slot)
  if v then
    tset(x, p, v)
  else  -- held under another engine hash already
    local dk = S .. ':d:' .. slot
    if redis.call('HEXISTS', dk, p) == 1 then redis.call('HINCRBY', dk, p, 1)
    else redis.call('HSET', dk, p, 2) end
    HAS[dk] = true
  end
end
local function strip(S, slot, p)
  local x = xs(S)
  local v = tget(x, p)
  if not v then return end
  v = bits_del(v, slot)
  if v == '' then tdel(x, p) elseif v then tset(x, p, v) end
end
-- The pod holds prefix p once less (its touch goes with its last holding).
local function release(S, slot, p)
  local dk = S .. ':d:' .. slot
  local d = has(dk) and redis.call('HGET', dk, p)
  if d then
    if d == '2' then redis.call('HDEL', dk, p) else redis.call('HINCRBY', dk, p, -1) end
    return
  end
  local tk = S .. ':t:' .. slot
  if has(tk) then redis.call('HDEL', tk, p) end
  strip(S, slot, p)
end
local function attach(S, slot, parent, row)
  if parent == '' then return end
  local k = ek(S, slot)
  local p, par, eff, ch = parse(row or eget(k, parent))
  if ch == 0 then leaf_rem(S, slot, parent) end
  eset(k, parent, fmt(p, par, eff, ch + 1))
end
-- A row (prefix p, parent par, recency eff) leaves its parent.
-- (With ``defer``, a parent made a leaf is not queued but returned: ``parent, its eff, its
-- prefix, its row``.)
local function detach(S, slot, p, par, eff, defer)
  if par == '' then return end
  local k = ek(S, slot)
  local v = eget(k, par)
  if not v then
    local ok = S .. ':o:' .. slot
    if redis.call('HINCRBY', ok, par, -1) <= 0 then redis.call('HDEL', ok, par) end
    return
  end
  local pp, ppar, peff, pch = parse(v)
  local reff = effective(S, slot, p, eff)
  if reff > peff then peff = reff end
  local row = fmt(pp, ppar, peff, pch - 1)
  eset(k, par, row)
  if pch - 1 == 0 then
    if defer then return par, peff, pp, row end
    leaf_add(S, slot, par, peff)
  end
end
local function would_loop(S, slot, e, parent)
  local k = ek(S, slot)
  while parent ~= '' do
    if parent == e then return true end
    local v = eget(k, parent)
    if not v then return false end
    local _, par = parse(v)
    parent = par
  end
  return false
end
-- Forget row e (BlockRemoved, eviction): its children become orphans.
local function remove_row(S, slot, e)
  local k = ek(S, slot)
  local p, par, eff, ch = parse(eget(k, e))
  detach(S, slot, p, par, eff)
  if ch > 0 then redis.call('HSET', S .. ':o:' .. slot, e, ch)
  else leaf_rem(S, slot, e) end
  redis.call('HDEL', k, e)
  release(S, slot, p)
  blocks_add(-1)
end
local function drop_holdings(S, pod, slot)
  slot = slot or redis.call('HGET', S .. ':s', pod)
  if not slot then return 0 end
  local k = ek(S, slot)
  local flat = redis.call('HGETALL', k)
  for i = 1, #flat, 2 do
    local p, _, _, ch = parse(flat[i + 1])
    strip(S, slot, p)
    if ch == 0 then leaf_rem(S, slot, flat[i]) end
  end
  local n = #flat / 2
  redis.call('UNLINK', k)
  redis.call('DEL', S .. ':o:' .. slot, S .. ':d:' .. slot, S .. ':t:' .. slot)
  redis.call('HDEL', S .. ':s', pod)
  redis.call('HDEL', S .. ':r', slot)
  redis.call('ZADD', S .. ':free', tonumber(slot), slot)
  if G ~= S then redis.call('SREM', G .. ':pc:' .. pod, S) end
  blocks_add(-n)
  return n
end
local function drop_context(S)
  local flat = redis.call('HGETALL', S .. ':s')
  for i = 1, #flat, 2 do drop_holdings(S, flat[i]) end
  tdrop(xs(S))
  -- (The pods' fences stay: a stale writer must stay refused.)
  redis.call('DEL', S .. ':s', S .. ':r', S .. ':lv', S .. ':q', S .. ':free')
  redis.call('HDEL', G .. ':n', 'slot:' .. S)
  redis.call('HDEL', G .. ':ctx', S)
  redis.call('HDEL', G .. ':bs', S)
  redis.call('ZREM', G .. ':lru', S)
  redis.call('HINCRBY', G .. ':n', 'evicted_contexts', 1)
end
-- The next leaf to evict from zset zk (touches folded in as they surface).
local function victim(zk)
  while true do
    local top = redis.call('ZRANGE', zk, 0, 0)
    if #top == 0 then return nil end
    local m = top[1]
    local e = ssub(m, 1, 8)
    local vS, vslot = smatch(m, '^(.*)|(%d+)$', 9)
    local k = ek(vS, vslot)
    local p, par, eff, ch = parse(eget(k, e))
    local tk = vS .. ':t:' .. vslot
    local t = has(tk) and redis.call('HGET', tk, p)
    if t and tonumber(t) > eff then
      eset(k, e, fmt(p, par, tonumber(t), ch))
      leaf_add(vS, vslot, e, tonumber(t))
    else
      return e, vS, vslot
    end
  end
end
-- Byte order (zsets order members so; Lua's < follows the locale).
local function bytes_less(a, b)
  for i = 1, math.min(#a, #b) do
    local u, w = sbyte(a, i), sbyte(b, i)
    if u ~= w then return u < w end
  end
  return #a < #b
end
-- Evict victims from zset zk while over(), at most cap of them; returns how many. A
-- victim's parent made a leaf is usually the next victim (a chain goes tail first): it
-- is compared with the queue's head (read once per chain) and, when it comes first,
-- evicted without a trip through the queues (memory_lru.evict does the same).
local EVICT_CAP = 256
local function evict(zk, over, cap)
  local n, chain, head = 0, nil, nil
  while n < cap and over() do
    local e, vS, vslot, queued, row
    if chain then
      e, vS, vslot, row, queued = chain[1], chain[2], chain[3], chain[4], false
      chain = nil
    else
      e, vS, vslot = victim(zk)
      if not e then break end
      head, queued = nil, true
    end
    local k = ek(vS, vslot)
    local p, par, eff = parse(row or eget(k, e))
    local pe, peff, pp, prow = detach(vS, vslot, p, par, eff, true)
    if queued then leaf_rem(vS, vslot, e) end
    redis.call('HDEL', k, e)
    release(vS, vslot, p)
    blocks_add(-1)
    n = n + 1
    -- (A victim is a leaf: if its parent is held, the pod's rows are not all gone.)
    if (par == '' or not pe and not eget(k, par)) and redis.call('EXISTS', k) == 0 then
      drop_holdings(vS, redis.call('HGET', vS .. ':r', vslot), vslot)
      pe, head = nil, nil
    end
    if pe then
      local tk = vS .. ':t:' .. vslot
      local t = has(tk) and redis.call('HGET', tk, pp)
      local next_up = not (t and tonumber(t) > peff)  -- a touch may reorder it: queue it
      if next_up then
        if head == nil then
          local top = redis.call('ZRANGE', zk, 0, 0, 'WITHSCORES')
          head = #top > 0 and {tonumber(top[2]), top[1]} or false
        end
        if head and (head[1] < peff or (head[1] == peff
            and bytes_less(head[2], member(vS, vslot, pe)))) then
          next_up = false
        end
      end
      if next_up then chain = {pe, vS, vslot, prow} else leaf_add(vS, vslot, pe, peff) end
    end
  end
  if chain then
    local _, _, ceff = parse(eget(ek(chain[2], chain[3]), chain[1]))
    leaf_add(chain[2], chain[3], chain[1], ceff)
  end
  if n > 0 then redis.call('HINCRBY', G .. ':n', 'evicted_blocks', n) end
  return n
end
-- Each limit, once exceeded, evicts down to its low watermark - at most EVICT_CAP blocks
-- per call, so that no script blocks Redis for long: a bigger gap (budgets above 16384)
-- is closed by the calls that follow, each of which finds the index over its limit.
local function enforce_limits(S, max_prefixes, low_prefixes, max_blocks, low_blocks)
  local x = xs(S)
  local cap = EVICT_CAP
  if x[3] > max_prefixes then
    cap = cap - evict(S .. ':lv', function() return x[3] > low_prefixes end, cap)
  end
  if blocks() > max_blocks then
    evict(G .. ':lv', function() return blocks() > low_blocks end, cap)
  end
end
"""
