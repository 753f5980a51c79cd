-- A host's measured GPU capacity, published only while the engines it runs hold
-- their reservations (app/state/ledger.py: Ledger.publish_capacity).
--
-- KEYS[1]: capacity hash, KEYS[2]: published marker; ARGV[1]: JSON {uuid: capacity
-- JSON}; ARGV[2..]: reservation keys that must exist. Publishes nothing and returns the
-- missing ones otherwise.
local missing = {}
for i = 2, #ARGV do
  if redis.call('EXISTS', ARGV[i]) == 0 then missing[#missing + 1] = ARGV[i] end
end
if #missing > 0 then return missing end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '1')
for uuid, cap in pairs(cjson.decode(ARGV[1])) do redis.call('HSET', KEYS[1], uuid, cap) end
return missing
