-- Exact sliding window for one (user, class), one round trip per decision
-- (DESIGN §9). The clock is Redis TIME, so every replica of the control
-- plane agrees on it.
--
-- KEYS[1]  sorted set ib_mcp_rl:{<user>}:<class>; score = admission time (µs)
-- ARGV[1]  limit (requests per window)
-- ARGV[2]  window (ms)
-- ARGV[3]  suffix that makes this request's member unique
--
-- Returns {allowed (0|1), remaining, µs until the oldest counted request
-- leaves the window (the whole window when none is counted), now (µs)}.
-- A request at t counts while now - t < window; a denial is not recorded.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local window_ms = tonumber(ARGV[2])
local window = window_ms * 1000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
local allowed = 0
local remaining = 0
if count < limit then
  redis.call('ZADD', KEYS[1], now, t[1] .. '.' .. t[2] .. ':' .. ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window_ms)
  allowed = 1
  remaining = limit - count - 1
end
local reset = window
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if oldest[2] then
  reset = tonumber(oldest[2]) + window - now
end
return {allowed, remaining, reset, now}
