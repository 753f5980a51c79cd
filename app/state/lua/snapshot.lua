-- The whole cluster in one read (app.state.snapshot).
-- ARGV[1]: key names (ledger.KEY_NAMES); ARGV[2..4]: "1" to read engines, GPU capacity,
-- reservations; ARGV[5]: the write number the caller's records are as of ('': none);
-- ARGV[6]: the ledger number its reservations are as of ('': none). Hosts are always
-- read. Returns {seq, ids, records, hosts, capacity, reservations | '', ledger seq}.
local K = cjson.decode(ARGV[1])
local seq = redis.call('GET', K.seq) or '0'
local ids, records, hosts, capacity = {}, {}, {}, {}
local reservations = ''
if ARGV[2] == '1' then
  ids = redis.call('SMEMBERS', K.engines)
  local since = ARGV[5]
  local want = ids
  if since ~= '' and tonumber(seq) >= tonumber(since) then
    want = redis.call('ZRANGEBYSCORE', K.record_seqs, '(' .. since, '+inf')
    if redis.call('ZCARD', K.record_seqs) ~= #ids then
      -- records written without a number (another version): read them every time
      for _, id in ipairs(ids) do
        if not redis.call('ZSCORE', K.record_seqs, id) then want[#want + 1] = id end
      end
    end
  end
  for i = 1, #want, 500 do
    local keys = {}
    for j = i, math.min(i + 499, #want) do keys[#keys + 1] = K.engine .. want[j] end
    for _, raw in ipairs(redis.call('MGET', unpack(keys))) do
      if raw then records[#records + 1] = raw end
    end
  end
end
for _, name in ipairs(redis.call('SMEMBERS', K.hosts)) do
  local live = redis.call('GET', K.host .. name)
  local raw = live or redis.call('GET', K.host_last .. name)
  if raw then hosts[#hosts + 1] = {raw, live and true or false} end
  if ARGV[3] == '1' then
    local caps = redis.call('HGETALL', K.capacity .. name)
    local gpus = {}
    for i = 1, #caps, 2 do
      local reserved = 0
      for _, v in ipairs(redis.call('HVALS', K.gpu .. name .. ':' .. caps[i])) do
        reserved = reserved + tonumber(v)
      end
      gpus[#gpus + 1] = {caps[i], cjson.decode(caps[i + 1]), reserved}
    end
    capacity[name] = gpus
  end
end
local ledger_seq = redis.call('GET', K.ledger_seq) or '0'
if ARGV[4] == '1' and ledger_seq ~= ARGV[6] then
  local held = {}
  for _, eid in ipairs(redis.call('SMEMBERS', K.reserved)) do
    local h = redis.call('HGETALL', K.reservation .. eid)
    if #h > 0 then
      local res = {id = eid}
      for i = 1, #h, 2 do res[h[i]] = h[i + 1] end
      res.gpus = cjson.decode(res.gpus or '[]')
      held[#held + 1] = res
    end
  end
  reservations = cjson.encode(held)
end
return {seq, table.concat(ids, '\n'), table.concat(records, '\n'), cjson.encode(hosts),
  cjson.encode(capacity), reservations, ledger_seq}
