-- Append one event to an engine's timeline (app.state.events).
-- KEYS[1]: the record, KEYS[2]: the timeline; ARGV[1]: the event JSON, ARGV[2]: bound.
-- Appends only while the record exists, so a late event cannot resurrect a timeline.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
return 1
