-- Prepended to the commit script (app.state.write_seq). finish_write(K, op, mode, eid,
-- victims, released): ``victims`` is a set of ids of other records written in the same
-- step (evictions); returns the number of this write as a string ('' when it wrote
-- nothing).
local function finish_write(K, op, mode, eid, victims, released)
  local seq = ''
  local ledger_changed = op.reserve ~= nil or released == 1
  if mode ~= 'none' or ledger_changed then
    local n = redis.call('INCR', K.seq)
    if n == 1 then  -- absent (a new or a lost Redis): go on from its clock, never back
      local t = redis.call('TIME')
      redis.call('SET', K.seq, t[1] .. string.format('%06d', tonumber(t[2])))
      n = redis.call('INCR', K.seq)
    end
    seq = string.format('%d', n)  -- not tostring(n): that keeps 14 digits only
    if mode == 'delete' then
      redis.call('ZREM', K.record_seqs, eid)
    elseif mode ~= 'none' then
      redis.call('ZADD', K.record_seqs, seq, eid)
    end
    for vid, _ in pairs(victims or {}) do redis.call('ZADD', K.record_seqs, seq, vid) end
    if ledger_changed then redis.call('SET', K.ledger_seq, seq) end
  end
  if op.notify then
    local notice = op.notify
    if seq ~= '' then notice = string.sub(notice, 1, -2) .. ', "seq": ' .. seq .. '}' end
    redis.call('PUBLISH', K.changes, notice)
  end
  return seq
end
