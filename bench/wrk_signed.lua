-- wrk script: POST a ~1.5 KB JSON event with a fresh unique id and a valid
-- HMAC-SHA256 signature (header X-Signature: sha256=<hex>) per request.
--
-- Signing in LuaJIT is affordable because the unique id is the last field of
-- the body: the SHA-256 state after the HMAC inner pad and the constant body
-- prefix is computed once per thread, so each request costs ~4 compressions.
-- Env: BENCH_SECRET (default "bench-secret"), printed figures in one line:
-- WRKJSON {...} (requests, rps, p50/p90/p99/max in ms, errors, non2xx).
local bit = require("bit")
local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local rshift, lshift, ror, tobit, tohex = bit.rshift, bit.lshift, bit.ror, bit.tobit, bit.tohex
local byte, char, rep, fmt = string.byte, string.char, string.rep, string.format

local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}
for i = 1, 64 do K[i] = tobit(K[i]) end
local H0 = { 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19 }
for i = 1, 8 do H0[i] = tobit(H0[i]) end

local W = {}
-- Compress one 64-byte block of s starting at offset off (1-based) into state h.
local function compress(h, s, off)
  for i = 0, 15 do
    local a, b, c, d = byte(s, off + i * 4, off + i * 4 + 3)
    W[i] = bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
  end
  for i = 16, 63 do
    local w15, w2 = W[i - 15], W[i - 2]
    local s0 = bxor(ror(w15, 7), ror(w15, 18), rshift(w15, 3))
    local s1 = bxor(ror(w2, 17), ror(w2, 19), rshift(w2, 10))
    W[i] = tobit(W[i - 16] + s0 + W[i - 7] + s1)
  end
  local a, b, c, d, e, f, g, hh = h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8]
  for i = 0, 63 do
    local S1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
    local ch = bxor(band(e, f), band(bnot(e), g))
    local t1 = tobit(hh + S1 + ch + K[i + 1] + W[i])
    local S0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
    local maj = bxor(band(a, b), band(a, c), band(b, c))
    local t2 = tobit(S0 + maj)
    hh, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + t2)
  end
  h[1], h[2], h[3], h[4] = tobit(h[1] + a), tobit(h[2] + b), tobit(h[3] + c), tobit(h[4] + d)
  h[5], h[6], h[7], h[8] = tobit(h[5] + e), tobit(h[6] + f), tobit(h[7] + g), tobit(h[8] + hh)
end

local function copy(h) return { h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8] } end

-- Finish a hash whose state h has already absorbed `done` bytes; `tail` is the rest.
local function finish(h, done, tail)
  local total = done + #tail
  local bits = total * 8
  local pad = tail .. "\128" .. rep("\0", (55 - total) % 64)
  pad = pad .. char(0, 0, 0, 0, band(rshift(bits, 24), 255), band(rshift(bits, 16), 255), band(rshift(bits, 8), 255), band(bits, 255))
  for off = 1, #pad, 64 do compress(h, pad, off) end
  local out = {}
  for i = 1, 8 do
    local x = h[i]
    out[i] = char(band(rshift(x, 24), 255), band(rshift(x, 16), 255), band(rshift(x, 8), 255), band(x, 255))
  end
  return table.concat(out)
end

local function tohexstr(raw)
  return (raw:gsub(".", function(c) return fmt("%02x", byte(c)) end))
end

local secret = os.getenv("BENCH_SECRET") or "bench-secret"
local key = secret .. rep("\0", 64 - #secret)
local ipad = key:gsub(".", function(c) return char(bxor(byte(c), 0x36)) end)
local opad = key:gsub(".", function(c) return char(bxor(byte(c), 0x5c)) end)
local outer0 = copy(H0); compress(outer0, opad, 1)

-- ~1.5 KB body; everything before the id is constant.
local lines = {}
for i = 1, 12 do
  lines[i] = fmt('{"sku":"SKU-%04d","qty":%d,"note":"%s"}', i, i, rep("lorem ipsum ", 6))
end
local prefix = '{"type":"ticket.message","customer":{"email":"client@example.test","name":"Client Name"},' ..
  '"subject":"Order question","text":"Hello, I have a question about my order and the delivery date.",' ..
  '"items":[' .. table.concat(lines, ",") .. '],"id":"'
local full = math.floor(#prefix / 64) * 64
local inner_mid, rest
local thread_tag = tostring(math.random(1, 2 ^ 30))

function setup(thread)
  thread:set("tag", fmt("%08x", math.random(0, 2 ^ 31)))
end

function init(args)
  inner_mid = copy(H0)
  compress(inner_mid, ipad, 1)
  for off = 1, full, 64 do compress(inner_mid, prefix, off) end
  rest = prefix:sub(full + 1)
  -- LuaJIT's random starts from the same seed in every wrk process: a salt after `--` keeps the
  -- ids of concurrent wrk processes apart (otherwise they collide and are deduplicated).
  thread_tag = (args[1] or "") .. (tag or thread_tag)
  counter = 0
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function request()
  counter = counter + 1
  local tail = fmt('%s-%x-%d"}', thread_tag, os.time(), counter)
  local body = prefix .. tail
  local inner = finish(copy(inner_mid), 64 + full, rest .. tail)
  local mac = finish(copy(outer0), 64, inner)
  return wrk.format(nil, nil, { ["X-Signature"] = "sha256=" .. tohexstr(mac) }, body)
end

done = function(summary, latency, requests)
  local dur = summary.duration / 1e6
  local e = summary.errors
  io.write(fmt(
    'WRKJSON {"requests":%d,"duration_s":%.3f,"rps":%.1f,"p50_ms":%.3f,"p90_ms":%.3f,' ..
    '"p99_ms":%.3f,"max_ms":%.3f,"socket_errors":%d,"non2xx":%d,"timeouts":%d,"body_bytes":%d}\n',
    summary.requests, dur, summary.requests / dur,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000,
    e.connect + e.read + e.write, e.status, e.timeout, #prefix + 24))
end
