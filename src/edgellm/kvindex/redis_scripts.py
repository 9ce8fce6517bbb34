"""The Lua scripts of the Redis backend (``redis_index.py``): each change is one script, so
it is atomic against other replicas. They keep the memory backend's rules, eviction order
included (``memory_lru.py``): the leaf queues are sorted sets kept exact as rows change.

Keys (``ns`` = namespace, ``cid`` = ``validate.context_id``, ``slot`` = a pod's number in a
context, never reused):

=============================  ======  ===================================================
``ns:ctx`` / ``ns:bs``            hash    cid -> JSON ``[model, lora]`` / its block size
``ns:lru``                      zset    cid by last access time (idle / max-contexts eviction)
``ns:x:{cid}``                  hash    prefix hash -> ``",3,17,"`` (slots holding it)
``ns:s:{cid}`` / ``ns:r:{cid}``  hash    pod -> slot / slot -> pod
``ns:e:{cid}:{slot}``           hash    engine hash -> row ``"prefix parent eff children"``
``ns:o:{cid}:{slot}``           hash    engine hash not held -> rows naming it as parent
``ns:d:{cid}:{slot}``           hash    prefix held under 2+ engine hashes -> how many
``ns:t:{cid}:{slot}``           hash    prefix -> tick of the last match ending there
``ns:lv`` / ``ns:lv:{cid}``      zset    leaf rows ``"engine(20 digits)|cid|slot"`` by eff
``ns:pc:{pod}``                 set     the pod's contexts (clear / remove in its own time)
``ns:n``                        hash    counters: blocks, tick, slot ids, evictions...
=============================  ======  ===================================================

Hashes travel as decimal strings (Lua numbers are doubles); ticks and counts are small.
Keys are built inside scripts, so this needs one Redis (or a replicated primary), not
Redis Cluster.
"""

from __future__ import annotations

COMMON = r"""
local ns = ARGV[1]
local function parse(v)
  local p, par, eff, ch = string.match(v, '^(%d+) (%d*) (%d+) (%d+)$')
  return p, par, tonumber(eff), tonumber(ch)
end
local function fmt(p, par, eff, ch)
  return p .. ' ' .. par .. ' ' .. string.format('%d', eff) .. ' ' .. string.format('%d', ch)
end
local function member(cid, slot, e)
  return string.rep('0', 20 - #e) .. e .. '|' .. cid .. '|' .. slot
end
local function leaf_add(cid, slot, e, eff)
  local m = member(cid, slot, e)
  redis.call('ZADD', ns .. ':lv', eff, m)
  redis.call('ZADD', ns .. ':lv:' .. cid, eff, m)
end
local function leaf_rem(cid, slot, e)
  local m = member(cid, slot, e)
  redis.call('ZREM', ns .. ':lv', m)
  redis.call('ZREM', ns .. ':lv:' .. cid, m)
end
local function effective(cid, slot, p, eff)
  local t = redis.call('HGET', ns .. ':t:' .. cid .. ':' .. slot, p)
  if t and tonumber(t) > eff then return tonumber(t) end
  return eff
end
-- The pod (slot) holds prefix p once more.
local function hold_key(cid, slot, p)
  local xk = ns .. ':x:' .. cid
  local tag = ',' .. slot .. ','
  local v = redis.call('HGET', xk, p)
  if not v then
    redis.call('HSET', xk, p, tag)
  elseif not string.find(v, tag, 1, true) then
    redis.call('HSET', xk, p, v .. slot .. ',')
  else
    local dk = ns .. ':d:' .. cid .. ':' .. slot
    if redis.call('HEXISTS', dk, p) == 1 then redis.call('HINCRBY', dk, p, 1)
    else redis.call('HSET', dk, p, 2) end
  end
end
local function strip(cid, slot, p)
  local xk = ns .. ':x:' .. cid
  local v = redis.call('HGET', xk, p)
  if not v then return end
  local s, e = string.find(v, ',' .. slot .. ',', 1, true)
  if not s then return end
  v = string.sub(v, 1, s) .. string.sub(v, e + 1)
  if v == ',' then redis.call('HDEL', xk, p) else redis.call('HSET', xk, p, v) end
end
-- The pod holds prefix p once less (its touch goes with its last holding).
local function release(cid, slot, p)
  local dk = ns .. ':d:' .. cid .. ':' .. slot
  local d = redis.call('HGET', dk, p)
  if d then
    if d == '2' then redis.call('HDEL', dk, p) else redis.call('HINCRBY', dk, p, -1) end
    return
  end
  redis.call('HDEL', ns .. ':t:' .. cid .. ':' .. slot, p)
  strip(cid, slot, p)
end
local function attach(cid, slot, parent)
  if parent == '' then return end
  local ek = ns .. ':e:' .. cid .. ':' .. slot
  local p, par, eff, ch = parse(redis.call('HGET', ek, parent))
  if ch == 0 then leaf_rem(cid, slot, parent) end
  redis.call('HSET', ek, parent, fmt(p, par, eff, ch + 1))
end
-- A row (prefix p, parent par, recency eff) leaves its parent.
local function detach(cid, slot, p, par, eff)
  if par == '' then return end
  local ek = ns .. ':e:' .. cid .. ':' .. slot
  local v = redis.call('HGET', ek, par)
  if not v then
    local ok = ns .. ':o:' .. cid .. ':' .. slot
    if redis.call('HINCRBY', ok, par, -1) <= 0 then redis.call('HDEL', ok, par) end
    return
  end
  local pp, ppar, peff, pch = parse(v)
  local reff = effective(cid, slot, p, eff)
  if reff > peff then peff = reff end
  redis.call('HSET', ek, par, fmt(pp, ppar, peff, pch - 1))
  if pch - 1 == 0 then leaf_add(cid, slot, par, peff) end
end
local function would_loop(cid, slot, e, parent)
  local ek = ns .. ':e:' .. cid .. ':' .. slot
  while parent ~= '' do
    if parent == e then return true end
    local v = redis.call('HGET', ek, parent)
    if not v then return false end
    local _, par = parse(v)
    parent = par
  end
  return false
end
-- Forget row e (BlockRemoved, eviction): its children become orphans.
local function remove_row(cid, slot, e)
  local ek = ns .. ':e:' .. cid .. ':' .. slot
  local p, par, eff, ch = parse(redis.call('HGET', ek, e))
  detach(cid, slot, p, par, eff)
  if ch > 0 then redis.call('HSET', ns .. ':o:' .. cid .. ':' .. slot, e, ch)
  else leaf_rem(cid, slot, e) end
  redis.call('HDEL', ek, e)
  release(cid, slot, p)
  redis.call('HINCRBY', ns .. ':n', 'blocks', -1)
end
local function drop_holdings(cid, pod)
  local slot = redis.call('HGET', ns .. ':s:' .. cid, pod)
  if not slot then return 0 end
  local ek = ns .. ':e:' .. cid .. ':' .. slot
  local flat = redis.call('HGETALL', ek)
  for i = 1, #flat, 2 do
    local p, _, _, ch = parse(flat[i + 1])
    strip(cid, slot, p)
    if ch == 0 then leaf_rem(cid, slot, flat[i]) end
  end
  local n = #flat / 2
  local tail = cid .. ':' .. slot
  redis.call('DEL', ek, ns .. ':o:' .. tail, ns .. ':d:' .. tail, ns .. ':t:' .. tail)
  redis.call('HDEL', ns .. ':s:' .. cid, pod)
  redis.call('HDEL', ns .. ':r:' .. cid, slot)
  redis.call('SREM', ns .. ':pc:' .. pod, cid)
  redis.call('HINCRBY', ns .. ':n', 'blocks', 0 - n)
  return n
end
local function drop_context(cid)
  local flat = redis.call('HGETALL', ns .. ':s:' .. cid)
  for i = 1, #flat, 2 do drop_holdings(cid, flat[i]) end
  redis.call('DEL', ns .. ':x:' .. cid, ns .. ':s:' .. cid, ns .. ':r:' .. cid,
             ns .. ':lv:' .. cid)
  redis.call('HDEL', ns .. ':n', 'slot:' .. cid)
  redis.call('HDEL', ns .. ':ctx', cid)
  redis.call('HDEL', ns .. ':bs', cid)
  redis.call('ZREM', ns .. ':lru', cid)
  redis.call('HINCRBY', ns .. ':n', 'evicted_contexts', 1)
end
-- The next leaf to evict from zset zk (touches folded in as they surface).
local function victim(zk)
  while true do
    local top = redis.call('ZRANGE', zk, 0, 0, 'WITHSCORES')
    if #top == 0 then return nil end
    local e, vcid, vslot = string.match(top[1], '^0*(%d+)|([^|]+)|(%d+)$')
    local ek = ns .. ':e:' .. vcid .. ':' .. vslot
    local p, par, eff, ch = parse(redis.call('HGET', ek, e))
    local t = redis.call('HGET', ns .. ':t:' .. vcid .. ':' .. vslot, p)
    if t and tonumber(t) > eff then
      redis.call('HSET', ek, e, fmt(p, par, tonumber(t), ch))
      leaf_add(vcid, vslot, e, tonumber(t))
    else
      return e, vcid, vslot
    end
  end
end
local function evict_one(zk)
  local e, vcid, vslot = victim(zk)
  if not e then return false end
  remove_row(vcid, vslot, e)
  redis.call('HINCRBY', ns .. ':n', 'evicted_blocks', 1)
  if redis.call('HLEN', ns .. ':e:' .. vcid .. ':' .. vslot) == 0 then
    drop_holdings(vcid, redis.call('HGET', ns .. ':r:' .. vcid, vslot))
  end
  return true
end
local function enforce_limits(cid, max_prefixes, low_prefixes, max_blocks, low_blocks)
  local xk = ns .. ':x:' .. cid
  if redis.call('HLEN', xk) > max_prefixes then
    while redis.call('HLEN', xk) > low_prefixes and evict_one(ns .. ':lv:' .. cid) do end
  end
  local nk = ns .. ':n'
  if tonumber(redis.call('HGET', nk, 'blocks') or '0') > max_blocks then
    while tonumber(redis.call('HGET', nk, 'blocks') or '0') > low_blocks
        and evict_one(ns .. ':lv') do end
  end
end
"""

# ARGV: ns, cid, pod, parent_engine_hash   Returns the parent's prefix hash, or nil.
PARENT = r"""
local ns = ARGV[1]
local slot = redis.call('HGET', ns .. ':s:' .. ARGV[2], ARGV[3])
if not slot then return false end
local v = redis.call('HGET', ns .. ':e:' .. ARGV[2] .. ':' .. slot, ARGV[4])
if not v then return false end
return string.match(v, '^(%d+) ')
"""

# ARGV: ns, cid, pod, ctx_json, now, block_size, max_contexts, max_prefixes, low_prefixes,
#       max_blocks, low_blocks, parent_e, parent_p, e1, p1, e2, p2, ...
# parent_e / parent_p: the parent's engine hash and the prefix hash the client chained on
# ("" for a root chain), checked here since another replica may have changed it.
# Returns {stored}: -1 if the parent is not held as the client thought, -2 if the block
# size differs.
STORE = COMMON + r"""
local cid, pod = ARGV[2], ARGV[3]
local known_bs = redis.call('HGET', ns .. ':bs', cid)
if known_bs and known_bs ~= ARGV[6] then return {-2} end
local parent = ARGV[12]
local slot = redis.call('HGET', ns .. ':s:' .. cid, pod)
if parent ~= '' then
  if not slot then return {-1} end
  local v = redis.call('HGET', ns .. ':e:' .. cid .. ':' .. slot, parent)
  if not v or string.match(v, '^(%d+) ') ~= ARGV[13] then return {-1} end
end
if not known_bs then
  -- A new context: beyond max_contexts the least recently used one goes first.
  if redis.call('ZCARD', ns .. ':lru') >= tonumber(ARGV[7]) then
    local old = redis.call('ZRANGE', ns .. ':lru', 0, 0)
    if #old > 0 then drop_context(old[1]) end
  end
  redis.call('HSET', ns .. ':bs', cid, ARGV[6])
  redis.call('HSET', ns .. ':ctx', cid, ARGV[4])
end
redis.call('ZADD', ns .. ':lru', ARGV[5], cid)
if not slot then
  slot = tostring(redis.call('HINCRBY', ns .. ':n', 'slot:' .. cid, 1) - 1)
  redis.call('HSET', ns .. ':s:' .. cid, pod, slot)
  redis.call('HSET', ns .. ':r:' .. cid, slot, pod)
  redis.call('SADD', ns .. ':pc:' .. pod, cid)
end
local ek = ns .. ':e:' .. cid .. ':' .. slot
local ok = ns .. ':o:' .. cid .. ':' .. slot
local tick = redis.call('HINCRBY', ns .. ':n', 'tick', 1)
local prev = parent
local engines = {}
for i = 14, #ARGV, 2 do
  local e, p = ARGV[i], ARGV[i + 1]
  local v = redis.call('HGET', ek, e)
  if not v then
    hold_key(cid, slot, p)
    local children = tonumber(redis.call('HGET', ok, e) or '0')
    local link = prev
    if children > 0 then
      redis.call('HDEL', ok, e)
      if would_loop(cid, slot, e, prev) then link = '' end
    end
    redis.call('HSET', ek, e, fmt(p, link, tick, children))
    attach(cid, slot, link)
    redis.call('HINCRBY', ns .. ':n', 'blocks', 1)
  else
    local op, opar, oeff, och = parse(v)
    if opar ~= prev and not would_loop(cid, slot, e, prev) then
      detach(cid, slot, op, opar, oeff)
      attach(cid, slot, prev)
      opar = prev
    end
    if op ~= p then
      release(cid, slot, op)
      hold_key(cid, slot, p)
      op = p
    end
    local _, _, _, ch = parse(redis.call('HGET', ek, e))
    redis.call('HSET', ek, e, fmt(op, opar, tick, ch))
  end
  engines[#engines + 1] = e
  prev = e
end
local seen = {}
for _, e in ipairs(engines) do
  if not seen[e] then
    seen[e] = true
    local _, _, eff, ch = parse(redis.call('HGET', ek, e))
    if ch == 0 then leaf_add(cid, slot, e, eff) end
  end
end
enforce_limits(cid, tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]),
               tonumber(ARGV[11]))
if redis.call('HLEN', ek) == 0 then drop_holdings(cid, pod) end
return {#engines}
"""

# ARGV: ns, cid, pod, now, e1, e2, ...   Returns how many rows went.
REMOVE = COMMON + r"""
local cid, pod = ARGV[2], ARGV[3]
local slot = redis.call('HGET', ns .. ':s:' .. cid, pod)
if not slot then return 0 end
redis.call('ZADD', ns .. ':lru', ARGV[4], cid)
local ek = ns .. ':e:' .. cid .. ':' .. slot
local removed = 0
for i = 5, #ARGV do
  if redis.call('HEXISTS', ek, ARGV[i]) == 1 then
    remove_row(cid, slot, ARGV[i])
    removed = removed + 1
  end
end
if redis.call('HLEN', ek) == 0 then drop_holdings(cid, pod) end
return removed
"""

# ARGV: ns, cid, pod   Returns how many rows the pod had there.
CLEAR = COMMON + r"""
return drop_holdings(ARGV[2], ARGV[3])
"""

# ARGV: ns, cid
DROP_CONTEXT = COMMON + r"""
drop_context(ARGV[2])
return 1
"""

# ARGV: ns, cid, now, n_ready, pod1..podN, h1, h2, ...
# Returns a flat {pod, matched_blocks, ...}; each pod's last matched prefix is touched, in
# pod-key order (one tick each).
MATCH = r"""
local ns, cid = ARGV[1], ARGV[2]
if redis.call('ZSCORE', ns .. ':lru', cid) == false then return {} end
redis.call('ZADD', ns .. ':lru', ARGV[3], cid)
local n_ready = tonumber(ARGV[4])
local alive, n_alive = {}, 0
if n_ready > 0 then
  local slots = redis.call('HMGET', ns .. ':s:' .. cid, unpack(ARGV, 5, 4 + n_ready))
  for i = 1, n_ready do
    if slots[i] and not alive[slots[i]] then alive[slots[i]] = ARGV[4 + i]; n_alive = n_alive + 1 end
  end
end
local found = {}
if n_alive == 0 then return {} end
local xk = ns .. ':x:' .. cid
local first = 5 + n_ready
local done, previous = 0, nil
for i = first, #ARGV do
  local v = redis.call('HGET', xk, ARGV[i])
  if not v then break end
  if v ~= previous then
    for slot, pod in pairs(alive) do
      if not string.find(v, ',' .. slot .. ',', 1, true) then
        if done > 0 then found[#found + 1] = {pod, done, slot} end
        alive[slot] = nil
        n_alive = n_alive - 1
      end
    end
    previous = v
    if n_alive == 0 then break end
  end
  done = done + 1
end
if n_alive > 0 and done > 0 then
  for slot, pod in pairs(alive) do found[#found + 1] = {pod, done, slot} end
end
-- Pod-key order as Python sees it (code points, i.e. UTF-8 bytes), whatever the locale.
local function less(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
table.sort(found, function(a, b) return less(a[1], b[1]) end)
local out = {}
for _, f in ipairs(found) do
  local tick = redis.call('HINCRBY', ns .. ':n', 'tick', 1)
  redis.call('HSET', ns .. ':t:' .. cid .. ':' .. f[3], ARGV[first + f[2] - 1], tick)
  out[#out + 1] = f[1]
  out[#out + 1] = f[2]
end
return out
"""
