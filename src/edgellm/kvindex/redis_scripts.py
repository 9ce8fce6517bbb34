"""The Lua scripts of the Redis backend (``redis_index.py``), each atomic in its shard.

Every script takes ``KEYS[1] = <shard>:m`` (only so that Redis Cluster routes it: keys are
built inside, all in the shard's slot, ``redis_keys.py``) and ``ARGV[1] = G`` (the scope,
``redis_lua.py``), ``ARGV[2] = S`` (the shard's key prefix).

BATCH is the ingest path: one call applies every event of one engine batch (or of one API
call) for one pod, in order, so a batch costs one script and a group of batches one
pipelined round trip. Its operations (one ARGV each, hashes as 8 raw big-endian bytes):

==================================================  =========================================
``'S' hp parent_e(8) parent_p(8) bs(4) E P``          BlockStored of block size bs: engine
                                                     hashes E (8n bytes), prefix hashes P
                                                     (8n, chained on parent_p by the client);
                                                     ``hp`` ``'1'`` if a parent
``'X' hp parent_e(8) invalid bs(4)``                 a BlockStored not indexed (no full block,
                                                     bad tokens): counted like memory counts it
``'R' E(8n)``                                        BlockRemoved in this shard
``'C'``                                              the pod's entries in this shard go
==================================================  =========================================

Results, one per operation: blocks stored (``-1`` unknown parent, ``-2`` block size
mismatch), rows removed or cleared. The reply is ``{status, results...}``:

- ``ok``: all applied; the batch's mark (``ARGV[12]``, ``"seq,digest"``, if any) is
  committed with them (a clear operation deletes the mark first);
- ``behind``: the pod's committed mark is not ``ARGV[14]`` (the one the writer committed
  last): writes were lost (a restart, a failover to a lagging replica); nothing applied;
- ``fenced``: ``ARGV[11]`` (the writer's lease epoch) is below the pod's fence in this
  shard: a newer holder took the pod over; nothing was applied;
- ``stalled``: an earlier call of this pipeline stopped on a mismatch (below) for this pod;
  nothing applied until the client resends with ``resume`` (``ARGV[13]``);
- ``mismatch``: the parent is held, but under another prefix hash than the client chained
  on (another writer re-stored it): the operations before it applied (their results
  follow ``mismatch, i, actual_prefix``), the rest wait for the client to rehash.
"""

from __future__ import annotations

from edgellm.kvindex.redis_lua import COMMON

__all__ = ["BATCH", "DROP_CONTEXT", "IDLE", "MATCH", "PARENTS", "STATS", "TAKEOVER"]

# ARGV: G, S, pod, ctx_json, now, max_contexts, max_prefixes, low_prefixes, max_blocks,
#       low_blocks, epoch ('' none), mark to commit ('' none), resume ('1'/'0'),
#       mark expected ('' none), ops...
BATCH = COMMON + r"""
local S, pod, now = ARGV[2], ARGV[3], ARGV[5]
local function u32(s, at)
  local a, b, c, d = sbyte(s, at, at + 3)
  return sformat('%d', ((a * 256 + b) * 256 + c) * 256 + d)
end
if ARGV[11] ~= '' then
  local fence = redis.call('HGET', S .. ':f', pod)
  local epoch = tonumber(ARGV[11])
  if fence and tonumber(fence) > epoch then return {'fenced'} end
  if not fence or tonumber(fence) < epoch then redis.call('HSET', S .. ':f', pod, ARGV[11]) end
end
if ARGV[13] == '1' then redis.call('HDEL', S .. ':stall', pod)
elseif redis.call('HEXISTS', S .. ':stall', pod) == 1 then return {'stalled'} end
if ARGV[14] ~= '' then
  local mark = redis.call('HGET', S .. ':q', pod)
  if mark ~= ARGV[14] then return {'behind', mark or ''} end
end

CTX_LEAVES = tonumber(ARGV[7]) < tonumber(ARGV[9])
local function count(name) redis.call('HINCRBY', G .. ':n', name, 1) end
-- What every operation of this call needs, read once: all of them are one pod's in S.
local SLOT = redis.call('HGET', S .. ':s', pod) or false
local KNOWN_BS = nil  -- the context's block size, read by the first store
local function known_bs()
  if KNOWN_BS == nil then KNOWN_BS = redis.call('HGET', G .. ':bs', S) or false end
  return KNOWN_BS
end
local TICKS, TICK = nil, 0  -- ticks reserved for this call's stores (one per store op)
local TOUCHED = false  -- the context's access time set
local function touch_context()
  if not TOUCHED then redis.call('ZADD', G .. ':lru', now, S); TOUCHED = true end
end
local function next_tick()
  if not TICKS then
    local stores = 0
    for i = 15, #ARGV do if sbyte(ARGV[i], 1) == 83 then stores = stores + 1 end end
    TICKS = redis.call('HINCRBY', G .. ':n', 'tick', stores) - stores
  end
  TICK = TICK + 1
  return TICKS + TICK
end

local function store(op)
  local bs = u32(op, 19)
  if known_bs() and KNOWN_BS ~= bs then count('block_size_mismatch'); return -2 end
  local parent, prow = '', nil
  local slot = SLOT
  if sbyte(op, 2) == 49 then
    parent = ssub(op, 3, 10)
    prow = slot and eget(ek(S, slot), parent)
    if not prow then count('unknown_parent'); return -1 end
    if ssub(prow, 1, 8) ~= ssub(op, 11, 18) then return nil, ssub(prow, 1, 8) end
  end
  if not KNOWN_BS then
    -- A new context: beyond max_contexts the least recently used one goes first.
    if redis.call('ZCARD', G .. ':lru') >= tonumber(ARGV[6]) then
      local old = redis.call('ZRANGE', G .. ':lru', 0, 0)
      if #old > 0 then drop_context(old[1]) end
    end
    redis.call('HSET', G .. ':bs', S, bs)
    redis.call('HSET', G .. ':ctx', S, ARGV[4])
    KNOWN_BS = bs
  end
  touch_context()
  if not slot then
    slot = redis.call('ZPOPMIN', S .. ':free')[1]
    if not slot then
      slot = tostring(redis.call('HINCRBY', G .. ':n', 'slot:' .. S, 1) - 1)
    end
    redis.call('HSET', S .. ':s', pod, slot)
    redis.call('HSET', S .. ':r', slot, pod)
    if G ~= S then redis.call('SADD', G .. ':pc:' .. pod, S) end
    SLOT = slot
  end
  local k = ek(S, slot)
  local ok = S .. ':o:' .. slot
  local tick = next_tick()
  local n = (#op - 22) / 16
  local E, P = {}, {}
  for i = 1, n do
    local at = 23 + 8 * (i - 1)
    E[i] = ssub(op, at, at + 7)
    P[i] = ssub(op, at + 8 * n, at + 8 * n + 7)
  end
  local ppos = prow and select(5, parse(prow)) or nil
  -- All new (the bulk of events): one HMGET says so, one HSET writes the rows, each the
  -- child of the one before.
  local fast = not has(ok)
  if fast then
    local seen = {}
    for _, v in ipairs(hmget(k, E)) do
      if v then fast = false; break end
    end
    for i = 1, n do
      if seen[E[i]] then fast = false; break end
      seen[E[i]] = true
    end
  end
  if fast then
    -- Positions from the event's chain (its prefixes follow it): a chunk's blocks share
    -- their bucket, so its key is made once per chunk.
    local args, prev = {}, parent
    local effb, bits = eff6(tick), own_bits(slot)
    local off, bid, xk = CHUNK - 1, nil, nil
    if ppos then off, bid = sbyte(ppos, 1), ssub(ppos, 2, 4) end
    for i = 1, n do
      off = (off + 1) % CHUNK
      if off == 0 then bid, xk = ssub(P[i], 6, 8), nil end
      xk = xk or S .. ':x:' .. bid
      args[2 * i - 1] = E[i]
      if prev == '' then
        args[2 * i] = P[i] .. 'R' .. effb .. OFFS[off] .. bid .. (i < n and '1' or '0')
      else
        args[2 * i] = P[i] .. 'P' .. prev .. effb .. OFFS[off] .. bid .. (i < n and '1' or '0')
      end
      prev = E[i]
      hold_key(S, slot, P[i], nil, bits, xk)
    end
    if parent ~= '' then  -- the parent gains a child: written with the new rows
      local pp, ppar, peff, pch = parse(prow)
      if pch == 0 then leaf_rem(S, slot, parent) end
      args[2 * n + 1] = parent
      args[2 * n + 2] = fmt(pp, ppar, peff, pch + 1, ppos)
    end
    hset(k, args)
    leaf_add(S, slot, E[n], tick)
    blocks_add(n)
  else
    local POS, pos = {}, ppos
    for i = 1, n do
      pos = pos_after(pos, P[i])
      POS[i] = pos
    end
    local prev = parent
    for i = 1, n do
      local e, p = E[i], P[i]
      local v = eget(k, e)
      if not v then
        hold_key(S, slot, p, POS[i])
        local children = tonumber(redis.call('HGET', ok, e) or '0')
        local link = prev
        if children > 0 then
          redis.call('HDEL', ok, e)
          if would_loop(S, slot, e, prev) then link = '' end
        end
        eset(k, e, fmt(p, link, tick, children, POS[i]))
        attach(S, slot, link)
        blocks_add(1)
      else
        local op_, opar, oeff, _, opos = parse(v)
        if opar ~= prev and not would_loop(S, slot, e, prev) then
          detach(S, slot, op_, opar, oeff)
          attach(S, slot, prev)
          opar = prev
        end
        if op_ ~= p then
          release(S, slot, op_, opos)
          hold_key(S, slot, p, POS[i])
          op_, opos = p, POS[i]
        end
        local _, _, _, ch = parse(eget(k, e))
        eset(k, e, fmt(op_, opar, tick, ch, opos))
      end
      prev = e
    end
    local done = {}
    for i = 1, n do
      local e = E[i]
      if not done[e] then
        done[e] = true
        local _, _, eff, ch = parse(eget(k, e))
        if ch == 0 then leaf_add(S, slot, e, eff) end
      end
    end
  end
  if enforce_limits(S, tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]),
                    tonumber(ARGV[10])) > 0 then
    if redis.call('EXISTS', k) == 0 then drop_holdings(S, pod) end
    SLOT = redis.call('HGET', S .. ':s', pod) or false  -- eviction may have dropped the pod
  end
  return n
end

local function reject(op)
  local bs = u32(op, 12)
  if known_bs() and KNOWN_BS ~= bs then count('block_size_mismatch'); return -2 end
  if sbyte(op, 2) == 49 then
    if not (SLOT and eget(ek(S, SLOT), ssub(op, 3, 10))) then
      count('unknown_parent')
      return -1
    end
  end
  if sbyte(op, 11) == 49 then count('invalid_tokens') end
  return 0
end

local function remove(op)
  local slot = SLOT
  if not slot then return 0 end
  touch_context()
  local k = ek(S, slot)
  local removed = 0
  for at = 2, #op, 8 do
    local e = ssub(op, at, at + 7)
    if redis.call('HEXISTS', k, e) == 1 then
      remove_row(S, slot, e)
      removed = removed + 1
    end
  end
  if redis.call('EXISTS', k) == 0 then drop_holdings(S, pod); SLOT = false end
  return removed
end

local out = {'ok'}
for i = 15, #ARGV do
  local op = ARGV[i]
  local kind = sbyte(op, 1)
  local r, actual
  if kind == 83 then r, actual = store(op)
  elseif kind == 88 then r = reject(op)
  elseif kind == 82 then r = remove(op)
  else  -- a clear: the committed mark no longer says what the index holds
    redis.call('HDEL', S .. ':q', pod)
    r = SLOT and drop_holdings(S, pod, SLOT) or 0
    SLOT = false
  end
  if r == nil then
    redis.call('HSET', S .. ':stall', pod, 1)
    flush()
    out[1] = 'mismatch'
    table.insert(out, 2, i - 14)
    table.insert(out, 3, actual)
    return out
  end
  out[#out + 1] = r
end
if ARGV[12] ~= '' then redis.call('HSET', S .. ':q', pod, ARGV[12]) end
flush()
return out
"""

# ARGV: G, S, pod, engine hashes (8n bytes). Returns each one's prefix hash, or false.
PARENTS = COMMON + r"""
local S, pod, blob = ARGV[2], ARGV[3], ARGV[4]
local slot = redis.call('HGET', S .. ':s', pod)
local out = {}
for at = 1, #blob, 8 do
  local v = slot and eget(ek(S, slot), ssub(blob, at, at + 7))
  out[#out + 1] = v and ssub(v, 1, 8) or false
end
return out
"""

# ARGV: G, S, now, block_size, n_ready (-1: every pod), the ready pods (sorted, each as
# 2 bytes of length and its bytes, in one argument: 64 arguments cost the client ~60 us),
# prefix hashes
# (8n).
# Returns {} (unknown context), {'bs', size} (the client hashed with another block size),
# or a flat {pod, matched_blocks, ...}; each pod's last matched prefix is touched, in
# pod-key order (one tick each).
MATCH = COMMON + r"""
local S = ARGV[2]
if redis.call('ZSCORE', G .. ':lru', S) == false then return {} end
redis.call('ZADD', G .. ':lru', ARGV[3], S)
local known_bs = redis.call('HGET', G .. ':bs', S)
if known_bs ~= ARGV[4] then return {'bs', tonumber(known_bs)} end
local n_ready = tonumber(ARGV[5])
local blob = ARGV[7]
if #blob == 0 then return {} end
local pods, n_alive = {}, 0  -- slot -> pod key of the candidates
local order = {}  -- slot -> its pod's position among the ready pods (sorted by the client)
if n_ready < 0 then
  local flat = redis.call('HGETALL', S .. ':r')
  for i = 1, #flat, 2 do pods[flat[i]] = flat[i + 1]; n_alive = n_alive + 1 end
elseif n_ready > 0 then
  local ready, at, packed = {}, 1, ARGV[6]
  for i = 1, n_ready do
    local hi, lo = sbyte(packed, at, at + 1)
    local len = hi * 256 + lo
    ready[i] = ssub(packed, at + 2, at + 1 + len)
    at = at + 2 + len
  end
  local slots = redis.call('HMGET', S .. ':s', unpack(ready))
  for i = 1, n_ready do
    if slots[i] and not pods[slots[i]] then
      pods[slots[i]] = ready[i]
      order[slots[i]] = i
      n_alive = n_alive + 1
    end
  end
end
if n_alive == 0 then return {} end
local found = {}
-- The walk (the hot loop of a lookup): one HMGET per chunk of CHUNK blocks (their prefixes
-- share a bucket, named by the chunk's first hash), and at each new holder bitmap the
-- pods whose bit is gone, byte by byte. Pods only drop out, so a value seen before
-- changes nothing.
local alive = {}  -- byte index -> bits of the candidate slots in it
for slot, _ in pairs(pods) do
  local n = tonumber(slot)
  local i = floor(n / 8)
  alive[i] = bor(alive[i] or 0, lshift(1, n % 8))
end
local call = redis.call
local xpre = S .. ':x:'
local nb = #blob / 8
local done, previous, stop = 0, nil, false
local first = 0  -- block index (from 0) of the chunk: its depths are first .. first + 15
while first < nb and not stop do
  local last = math.min(first + CHUNK, nb) - 1
  local at = 8 * first + 1
  local fields = {}
  for j = first, last do fields[#fields + 1] = ssub(blob, 8 * j + 1, 8 * j + 8) end
  local values = call('HMGET', xpre .. ssub(blob, at + 5, at + 7), unpack(fields))
  for j = 1, #values do
    local v = values[j]
    if not v then stop = true; break end
    if v ~= previous then
      local lo, len = sbyte(v, 1), #v - 1
      for i, mask in pairs(alive) do
        local k = i - lo
        local vb = (k >= 0 and k < len) and sbyte(v, k + 2) or 0
        local gone = band(mask, bnot(vb))
        if gone ~= 0 then
          for b = 0, 7 do
            if band(gone, lshift(1, b)) ~= 0 then
              local slot = tostring(8 * i + b)
              if done > 0 then found[#found + 1] = {pods[slot], done, slot} end
              n_alive = n_alive - 1
            end
          end
          local left = band(mask, vb)
          if left == 0 then alive[i] = nil else alive[i] = left end
        end
      end
      previous = v
      if n_alive == 0 then stop = true; break end
    end
    done = done + 1
  end
  first = last + 1
end
if n_alive > 0 and done > 0 then
  for i, mask in pairs(alive) do
    for b = 0, 7 do
      if band(mask, lshift(1, b)) ~= 0 then
        local slot = tostring(8 * i + b)
        found[#found + 1] = {pods[slot], done, slot}
      end
    end
  end
end
-- Touches in pod-key order as Python sees it (code points, i.e. UTF-8 bytes, whatever the
-- locale): the client sends ready pods sorted, so their position is that order.
if n_ready < 0 then
  local function less(a, b)
    for i = 1, math.min(#a, #b) do
      local u, w = sbyte(a, i), sbyte(b, i)
      if u ~= w then return u < w end
    end
    return #a < #b
  end
  table.sort(found, function(a, b) return less(a[1], b[1]) end)
else
  table.sort(found, function(a, b) return order[a[3]] < order[b[3]] end)
end
local out = {}
local tick = #found > 0 and redis.call('HINCRBY', G .. ':n', 'tick', #found) - #found or 0
for i, f in ipairs(found) do
  local at = 8 * (f[2] - 1) + 1
  redis.call('HSET', S .. ':t:' .. f[3], ssub(blob, at, at + 7), tick + i)
  out[#out + 1] = f[1]
  out[#out + 1] = f[2]
end
return out
"""

# ARGV: G, S
DROP_CONTEXT = COMMON + r"""
if redis.call('HEXISTS', G .. ':bs', ARGV[2]) == 1 then drop_context(ARGV[2]) end
flush()
return 1
"""

# ARGV: G, S, limit. Drops the shard's context if untouched since ``limit``; 1 if it did.
IDLE = COMMON + r"""
local at = redis.call('ZSCORE', G .. ':lru', ARGV[2])
if not at or tonumber(at) > tonumber(ARGV[3]) then return 0 end
drop_context(ARGV[2])
flush()
return 1
"""

# ARGV: G, S, pod, epoch. A new lease holder raises the pod's fence in the shard to its
# epoch (a stale holder's writes are refused from now on) and learns the sequence number
# committed with the last batch applied: {'ok', seq or false}, or {'fenced', fence} if a
# newer epoch is there already.
TAKEOVER = r"""
local S, pod, epoch = ARGV[2], ARGV[3], tonumber(ARGV[4])
local fence = redis.call('HGET', S .. ':f', pod)
if fence and tonumber(fence) > epoch then return {'fenced', fence} end
redis.call('HSET', S .. ':f', pod, ARGV[4])
return {'ok', redis.call('HGET', S .. ':q', pod)}
"""

# ARGV: G, S. The shard's {distinct prefixes, pods...}.
STATS = COMMON + r"""
local out = {xcount(ARGV[2])[1]}
local pods = redis.call('HKEYS', ARGV[2] .. ':s')
for i = 1, #pods do out[#out + 1] = pods[i] end
return out
"""
