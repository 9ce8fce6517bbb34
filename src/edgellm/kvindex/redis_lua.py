"""The Lua library every script of the Redis backend starts with (``redis_scripts.py``).

It keeps the memory backend's rules (``memory_lru.py``: rows, leaves, recency, touches)
over the key layout of ``redis_keys.py``. What makes it fast and small:

- *Compact encodings.* Engine and prefix hashes are 8 raw bytes, big-endian (so that byte
  order is numeric order: leaf ties break on the engine hash, as in memory). A row is
  ``prefix(8) .. ('P' .. parent(8) | 'R') .. eff(6 bytes) .. pos(4) .. children`` (28 bytes
  with a parent and under 10 children: Redis allocates it 32); a prefix's holders are a
  trimmed bitmap of the pods' slots in the shard (2 bytes for one holder). Slots are
  reused lowest first (``<shard>:free``), as in memory, so bitmaps stay short (up to 2048
  pods per shard).
- *Prefixes bucketed by chunk of the prompt.* A block at depth ``d`` of its chain belongs
  to the chunk of depths ``16*(d//16) ..``; its prefix hash is kept in the bucket
  ``<shard>:x:<3 bytes of the chunk's first prefix hash>``, a small hash (listpack:
  ~15 bytes a prefix). A lookup then reads a chunk - 16 blocks of the prompt - with one
  HMGET (the prompt's hashes name their chunks' buckets), and a store writes a block with
  one HSETNX. A row's ``pos`` (its depth mod 16, and its bucket) says where its prefix is,
  so removals and evictions find it; a child's ``pos`` follows from its parent's.
- *One hash per pod for its rows* (``e:<slot>``): an event's rows are read with one HMGET
  and written with one HSET, which saves more time than buckets would save bytes.

``ARGV[1]`` of every script is ``G``, the *scope* of the block budget, the clock (tick),
the leaf queue and the counters: the namespace on one Redis (one budget over every
context, exactly as in memory), the shard itself in Redis Cluster (a script may only
touch its own slot there, so each shard keeps its own budget; ``redis_keys.py``).
"""

from __future__ import annotations

__all__ = ["COMMON"]

COMMON = r"""
local G = ARGV[1]
local sbyte, ssub, smatch, sformat = string.byte, string.sub, string.match, string.format
local schar, srep, floor = string.char, string.rep, math.floor
-- Chain positions whose prefixes share a bucket (a lookup reads them with one HMGET): 16
-- reads an 8k-token prompt in 32 commands; 32 saves ~3 bytes a block but scans twice as
-- long per field.
local CHUNK = 16
local band, bor, bnot, lshift = bit.band, bit.bor, bit.bnot, bit.lshift
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
-- Counters read once and written back by flush(): the scope's blocks, each shard's
-- distinct prefixes (``<shard>:ls`` field ``x``).
local BLOCKS, BLOCKS_DIRTY = nil, false
local function blocks()
  if not BLOCKS then BLOCKS = tonumber(redis.call('HGET', G .. ':n', 'blocks') or '0') end
  return BLOCKS
end
local function blocks_add(d)
  BLOCKS = blocks() + d
  BLOCKS_DIRTY = true
end
-- (Prefix counts change by deltas, written with one HINCRBY: a pod's removal reads none.)
local XC = {}  -- shard -> {distinct prefixes (nil: not read), change not written yet}
local function xentry(S)
  local c = XC[S]
  if not c then
    c = {nil, 0}
    XC[S] = c
  end
  return c
end
local function xcount(S)
  local c = xentry(S)
  if c[1] == nil then c[1] = tonumber(redis.call('HGET', S .. ':ls', 'x') or '0') + c[2] end
  return c
end
local function xcount_add(S, d)
  local c = xentry(S)
  if c[1] ~= nil then c[1] = c[1] + d end
  c[2] = c[2] + d
end
local function flush()
  if BLOCKS_DIRTY then
    redis.call('HSET', G .. ':n', 'blocks', sformat('%d', BLOCKS))
    BLOCKS_DIRTY = false
  end
  for S, c in pairs(XC) do
    if c[2] ~= 0 then
      if redis.call('HINCRBY', S .. ':ls', 'x', c[2]) <= 0 then
        redis.call('HDEL', S .. ':ls', 'x')
      end
      c[2] = 0
    end
  end
end
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

-- Rows: prefix(8) .. ('P' .. parent(8) | 'R') .. eff(6) .. pos(4) .. children (decimal);
-- parent '' for none. parse() returns prefix, parent, eff, children, pos.
local function eff6(n)
  local f = n % 256
  n = (n - f) / 256
  local e = n % 256
  n = (n - e) / 256
  local d = n % 256
  n = (n - d) / 256
  local c = n % 256
  n = (n - c) / 256
  local b = n % 256
  return schar((n - b) / 256 % 256, b, c, d, e, f)
end
local function parse(v)
  local par, at = '', 10
  if sbyte(v, 9) == 80 then par, at = ssub(v, 10, 17), 18 end
  local a, b, c, d, e, f = sbyte(v, at, at + 5)
  return ssub(v, 1, 8), par, ((((a * 256 + b) * 256 + c) * 256 + d) * 256 + e) * 256 + f,
    tonumber(ssub(v, at + 10)), ssub(v, at + 6, at + 9)
end
local function fmt(p, par, eff, ch, pos)
  if par == '' then return p .. 'R' .. eff6(eff) .. pos .. ch end
  return p .. 'P' .. par .. eff6(eff) .. pos .. ch
end
-- The position of a block of prefix p whose parent is at ``ppos`` (nil: a root): its depth
-- mod 16 and the bucket of its chunk (3 bytes of the chunk's first prefix hash).
local OFFS = {}  -- depth mod CHUNK -> its byte
for i = 0, CHUNK - 1 do OFFS[i] = schar(i) end
local function pos_after(ppos, p)
  if not ppos then return OFFS[0] .. ssub(p, 6, 8) end
  local off = (sbyte(ppos, 1) + 1) % CHUNK
  if off == 0 then return OFFS[0] .. ssub(p, 6, 8) end
  return OFFS[off] .. ssub(ppos, 2, 4)
end
local function xkey(S, pos) return S .. ':x:' .. ssub(pos, 2, 4) end

-- Leaf queue members: engine(8) .. shard .. '|' .. slot, in G's queue and the shard's.
local function member(S, slot, e) return e .. S .. '|' .. slot end
-- The shard's own queue is kept only when its prefix limit is below the block budget: else
-- the budget always binds first (a context's prefixes are some of the blocks), and the
-- scope's queue serves both (BATCH sets this from its limits; replicas share limits).
local CTX_LEAVES = true
local function leaf_add(S, slot, e, eff)
  local m = member(S, slot, e)
  redis.call('ZADD', G .. ':lv', eff, m)
  if S ~= G and CTX_LEAVES then redis.call('ZADD', S .. ':lv', eff, m) end
end
local function leaf_rem(S, slot, e)
  local m = member(S, slot, e)
  redis.call('ZREM', G .. ':lv', m)
  if S ~= G and CTX_LEAVES then redis.call('ZREM', S .. ':lv', m) end
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
-- The pod (slot) holds prefix p (at ``pos``) once more.
local function hold_key(S, slot, p, pos, bits, b)
  b = b or xkey(S, pos)
  if redis.call('HSETNX', b, p, bits or own_bits(slot)) == 1 then  -- nobody held it yet
    xcount_add(S, 1)
    return
  end
  local v = bits_add(redis.call('HGET', b, p), slot)
  if v then
    redis.call('HSET', b, p, v)
  else  -- held under another engine hash already
    local dk = S .. ':d:' .. slot
    if redis.call('HEXISTS', dk, p) == 1 then redis.call('HINCRBY', dk, p, 1)
    else redis.call('HSET', dk, p, 2) end
    HAS[dk] = true
  end
end
local function strip(S, slot, p, pos)
  local b = xkey(S, pos)
  local v = redis.call('HGET', b, p)
  if not v then return end
  v = bits_del(v, slot)
  if v == '' then
    redis.call('HDEL', b, p)
    xcount_add(S, -1)
  elseif v then
    redis.call('HSET', b, p, v)
  end
end
-- The pod holds prefix p (at ``pos``) once less (its touch goes with its last holding).
local function release(S, slot, p, pos)
  local dk = S .. ':d:' .. slot
  local d = has(dk) and redis.call('HGET', dk, p)
  if d then
    if d == '2' then redis.call('HDEL', dk, p) else redis.call('HINCRBY', dk, p, -1) end
    return
  end
  local tk = S .. ':t:' .. slot
  if has(tk) then redis.call('HDEL', tk, p) end
  strip(S, slot, p, pos)
end
local function attach(S, slot, parent, row)
  if parent == '' then return end
  local k = ek(S, slot)
  local p, par, eff, ch, pos = parse(row or eget(k, parent))
  if ch == 0 then leaf_rem(S, slot, parent) end
  eset(k, parent, fmt(p, par, eff, ch + 1, pos))
end
-- A row (prefix p, parent par, recency eff) leaves its parent.
-- (With ``defer``, a parent made a leaf is neither written nor queued but returned:
-- ``parent, its eff, its prefix, its new row``: it is often the next victim.)
local function detach(S, slot, p, par, eff, defer)
  if par == '' then return end
  local k = ek(S, slot)
  local v = eget(k, par)
  if not v then
    local ok = S .. ':o:' .. slot
    if redis.call('HINCRBY', ok, par, -1) <= 0 then redis.call('HDEL', ok, par) end
    return
  end
  local pp, ppar, peff, pch, ppos = parse(v)
  local reff = effective(S, slot, p, eff)
  if reff > peff then peff = reff end
  local row = fmt(pp, ppar, peff, pch - 1, ppos)
  if defer and pch - 1 == 0 then return par, peff, pp, row end  -- (row not written yet)
  eset(k, par, row)
  if pch - 1 == 0 then leaf_add(S, slot, par, peff) end
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
  local p, par, eff, ch, pos = parse(eget(k, e))
  detach(S, slot, p, par, eff)
  if ch > 0 then
    redis.call('HSET', S .. ':o:' .. slot, e, ch)
    HAS[S .. ':o:' .. slot] = true
  else
    leaf_rem(S, slot, e)
  end
  redis.call('HDEL', k, e)
  release(S, slot, p, pos)
  blocks_add(-1)
end
local function drop_holdings(S, pod, slot)
  slot = slot or redis.call('HGET', S .. ':s', pod)
  if not slot then return 0 end
  local k = ek(S, slot)
  local flat = redis.call('HGETALL', k)
  for i = 1, #flat, 2 do
    local p, _, _, ch, pos = parse(flat[i + 1])
    strip(S, slot, p, pos)
    if ch == 0 then leaf_rem(S, slot, flat[i]) end
  end
  local n = #flat / 2
  redis.call('UNLINK', k)
  redis.call('DEL', S .. ':o:' .. slot, S .. ':d:' .. slot, S .. ':t:' .. slot)
  HAS[S .. ':o:' .. slot], HAS[S .. ':d:' .. slot], HAS[S .. ':t:' .. slot] = false, false, false
  redis.call('HDEL', S .. ':s', pod)
  redis.call('HDEL', S .. ':r', slot)
  redis.call('ZADD', S .. ':free', tonumber(slot), slot)
  if G ~= S then redis.call('SREM', G .. ':pc:' .. pod, S) end
  blocks_add(-n)
  return n
end
local function drop_context(S)
  local flat = redis.call('HGETALL', S .. ':s')
  -- (Its prefixes go with the last pod holding them: empty buckets vanish.)
  for i = 1, #flat, 2 do drop_holdings(S, flat[i]) end
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
    local p, par, eff, ch, pos = parse(eget(k, e))
    local tk = vS .. ':t:' .. vslot
    local t = has(tk) and redis.call('HGET', tk, p)
    if t and tonumber(t) > eff then
      eset(k, e, fmt(p, par, tonumber(t), ch, pos))
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
    local p, par, eff, _, pos = parse(row or eget(k, e))
    local pe, peff, pp, prow = detach(vS, vslot, p, par, eff, true)
    if queued then leaf_rem(vS, vslot, e) end
    redis.call('HDEL', k, e)
    release(vS, vslot, p, pos)
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
      if next_up then
        chain = {pe, vS, vslot, prow, peff}
      else
        eset(k, pe, prow)
        leaf_add(vS, vslot, pe, peff)
      end
    end
  end
  if chain then  -- not evicted after all: a leaf to queue
    eset(ek(chain[2], chain[3]), chain[1], chain[4])
    leaf_add(chain[2], chain[3], chain[1], chain[5])
  end
  if n > 0 then redis.call('HINCRBY', G .. ':n', 'evicted_blocks', n) end
  return n
end
-- Each limit, once exceeded, evicts down to its low watermark - at most EVICT_CAP blocks
-- per call, so that no script blocks Redis for long: a bigger gap (budgets above 16384)
-- is closed by the calls that follow, each of which finds the index over its limit.
local function enforce_limits(S, max_prefixes, low_prefixes, max_blocks, low_blocks)
  local x = xcount(S)
  local cap = EVICT_CAP
  if x[1] > max_prefixes then
    cap = cap - evict(S .. ':lv', function() return x[1] > low_prefixes end, cap)
  end
  if blocks() > max_blocks then
    cap = cap - evict(G .. ':lv', function() return blocks() > low_blocks end, cap)
  end
  return EVICT_CAP - cap  -- how many went
end
"""
