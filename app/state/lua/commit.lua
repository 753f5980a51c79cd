-- The one atomic write of an engine record and its reservation (app/state/ledger.py:
-- Committer; the guarantees are in that module's docstring). Loaded after write_seq's
-- finish_write (FINISH_WRITE_LUA), which numbers the write and publishes its notice.
--
-- ARGV[1]: JSON {id, mode, release, require_reserved, reserve?, notify?, events?};
-- ARGV[2]: the record as the caller read it (modes update/delete); ARGV[3]: the new
-- record (update/create); ARGV[4]: key names. mode: "update" (compare-and-set),
-- "create" (must not exist), "delete" (compare and delete), "none" (no record: ledger
-- only). notify: the message to PUBLISH; events: JSON strings to append to the
-- timeline (the port mark filled in). ARGV[5]: JSON list of evictions {id, expected,
-- new, notify, events} (with a reservation only): engines whose room the reservation
-- takes, compared and rewritten in the same step. Returns {status, port, released, seq}.
local op = cjson.decode(ARGV[1])
local K = cjson.decode(ARGV[4])
local eid, mode = op.id, op.mode
local rec_key = K.engine .. eid
local res_key = K.reservation .. eid

if mode == 'update' or mode == 'delete' then
  if redis.call('GET', rec_key) ~= ARGV[2] then return {'RETRY', '', 0} end
elseif mode == 'create' then
  if redis.call('EXISTS', rec_key) == 1 then return {'EXISTS', '', 0} end
end
if op.require_reserved and redis.call('EXISTS', res_key) == 0 then
  return {'UNRESERVED', 'engine ' .. eid .. ' holds no reservation', 0}
end
-- Evictions (ARGV[5]): engines whose room this write hands to eid. Each must be as
-- its caller read it; its room counts as free below, and is released, with its new
-- record written, only once everything else has been checked.
local evict = cjson.decode(ARGV[5] ~= '' and ARGV[5] or '[]')
local victims = {}
for _, v in ipairs(evict) do
  if redis.call('GET', K.engine .. v.id) ~= v.expected then return {'RETRY', '', 0} end
  victims[v.id] = true
end

local port = ''
local r = op.reserve
if r then
  local host = r.host
  local cap_key = K.capacity .. host
  local ports_key = K.ports .. host
  local moving = r.move and redis.call('EXISTS', res_key) == 1
  if redis.call('EXISTS', res_key) == 1 and not moving then
    if not r.reclaim then
      return {'ERR', 'engine ' .. eid .. ' already holds a reservation', 0}
    end
    port = redis.call('HGET', res_key, 'port')
  else
    local gpus = {}
    for i, g in ipairs(r.gpus) do
      local uuid, mib = g[1], tonumber(g[2])
      local raw = redis.call('HGET', cap_key, uuid)
      if raw then
        local cap = cjson.decode(raw)
        local reserved = 0
        local held = redis.call('HGETALL', K.gpu .. host .. ':' .. uuid)
        for i = 1, #held, 2 do
          -- a move counts the room the engine gives up as free
          -- (and so does the room of the engines it evicts)
          if not ((moving and held[i] == eid) or victims[held[i]]) then
            reserved = reserved + tonumber(held[i + 1])
          end
        end
        local free = cap.total_mib - cap.outside_mib - r.margin - reserved
        if mib > free then
          if free < 0 then free = 0 end
          return {'ERR', string.format('host %s, GPU %d: %.1f GB free, %.1f GB needed',
            host, cap.index, free / 1024, mib / 1024), 0}
        end
      elseif not r.reclaim then
        -- A running engine re-takes its room before its host offers capacity again
        -- (after a lost Redis); anything else needs the host's measured capacity.
        return {'ERR', 'host ' .. host .. ': GPU ' .. uuid .. ' is not in its inventory', 0}
      end
      gpus[#gpus + 1] = {uuid, mib}
    end
    local chosen = nil
    if r.port ~= 0 then
      local holder = redis.call('HGET', ports_key, tostring(r.port))
      if holder and holder ~= eid then
        return {'ERR', string.format('host %s: port %d is held by engine %s',
          host, r.port, holder), 0}
      end
      chosen = r.port
    else
      local taken = {}
      for _, p in ipairs(redis.call('HKEYS', ports_key)) do taken[tonumber(p)] = true end
      for _, p in ipairs(r.skip) do taken[tonumber(p)] = true end
      for p = r.lo, r.hi do
        if not taken[p] then chosen = p; break end
      end
      if not chosen then
        return {'ERR', string.format('host %s: no free port in %d-%d', host, r.lo, r.hi), 0}
      end
    end
    for _, v in ipairs(evict) do
      local vres = K.reservation .. v.id
      local vhost = redis.call('HGET', vres, 'host')
      if vhost then
        for _, g in ipairs(cjson.decode(redis.call('HGET', vres, 'gpus') or '[]')) do
          redis.call('HDEL', K.gpu .. vhost .. ':' .. g[1], v.id)
        end
        local vport = redis.call('HGET', vres, 'port')
        if vport and redis.call('HGET', K.ports .. vhost, vport) == v.id then
          redis.call('HDEL', K.ports .. vhost, vport)
        end
        redis.call('DEL', vres)
      end
      redis.call('SREM', K.reserved, v.id)
      redis.call('SET', K.engine .. v.id, v.new)
      local vev = K.events .. v.id
      for _, ev in ipairs(v.events) do redis.call('RPUSH', vev, ev) end
      redis.call('LTRIM', vev, -K.max_events, -1)
      redis.call('PUBLISH', K.changes, v.notify)
    end
    if moving then
      -- give up the old room in the same step that takes the new one
      local old_host = redis.call('HGET', res_key, 'host')
      for _, g in ipairs(cjson.decode(redis.call('HGET', res_key, 'gpus') or '[]')) do
        redis.call('HDEL', K.gpu .. old_host .. ':' .. g[1], eid)
      end
      local old_port = redis.call('HGET', res_key, 'port')
      if old_port and redis.call('HGET', K.ports .. old_host, old_port) == eid then
        redis.call('HDEL', K.ports .. old_host, old_port)
      end
      redis.call('DEL', res_key)
    end
    for _, g in ipairs(gpus) do
      redis.call('HSET', K.gpu .. host .. ':' .. g[1], eid, g[2])
    end
    redis.call('HSET', ports_key, tostring(chosen), eid)
    redis.call('HSET', res_key, 'host', host, 'port', chosen, 'gpus', cjson.encode(gpus))
    redis.call('SADD', K.reserved, eid)
    port = tostring(chosen)
  end
end

local released = 0
if op.release then
  local host = redis.call('HGET', res_key, 'host')
  if host then
    for _, g in ipairs(cjson.decode(redis.call('HGET', res_key, 'gpus') or '[]')) do
      redis.call('HDEL', K.gpu .. host .. ':' .. g[1], eid)
    end
    local held = redis.call('HGET', res_key, 'port')
    local ports_key = K.ports .. host
    if held and redis.call('HGET', ports_key, held) == eid then
      redis.call('HDEL', ports_key, held)
    end
    redis.call('DEL', res_key)
    released = 1
  end
  redis.call('SREM', K.reserved, eid)
end

if mode == 'delete' then
  redis.call('DEL', rec_key)
  redis.call('SREM', K.engines, eid)
  redis.call('DEL', K.events .. eid)
  redis.call('DEL', K.external_key .. eid)  -- an external engine's API key goes with it
elseif mode == 'update' or mode == 'create' then
  local raw = ARGV[3]
  if port ~= '' then
    raw = string.gsub(raw, '"' .. K.port_mark .. '"', port)
    raw = string.gsub(raw, K.port_mark, port)
  end
  redis.call('SET', rec_key, raw)
  if mode == 'create' then redis.call('SADD', K.engines, eid) end
  if op.events and #op.events > 0 then
    local ev_key = K.events .. eid
    for _, ev in ipairs(op.events) do
      if port ~= '' then
        ev = string.gsub(ev, '"' .. K.port_mark .. '"', port)
        ev = string.gsub(ev, K.port_mark, port)
      end
      redis.call('RPUSH', ev_key, ev)
    end
    redis.call('LTRIM', ev_key, -K.max_events, -1)
  end
end
return {'OK', port, released, finish_write(K, op, mode, eid, victims, released)}
