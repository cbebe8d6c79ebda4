-- wrk -s bench/post.lua: POST one precomputed body (wrk's LuaJIT has no base64,
-- and a 10 MB body is better read from a file than written into a script).
--   BENCH_PATH     request path
--   BENCH_BODY     file holding the request body
--   BENCH_HEADERS  file of "Name: value" lines (Content-Type, X-Envelope-*)
--   BENCH_KEY_PREFIX  when set: an Idempotency-Key of this prefix and a counter on every request
-- done() prints one line that bench/bench.py parses: wrk exits 0 even when every
-- response is an error, so the run is judged by these counts.
local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH")
wrk.body = slurp(os.getenv("BENCH_BODY"))
for line in slurp(os.getenv("BENCH_HEADERS")):gmatch("[^\r\n]+") do
  local name, value = line:match("^([^:]+):%s*(.-)%s*$")
  wrk.headers[name] = value
end

function done(summary, latency, requests)
  local e = summary.errors
  -- e.status counts responses with a status above 399 (there are no 3xx here).
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d non2xx=%d connect=%d read=%d write=%d timeout=%d " ..
    "p50_us=%d p90_us=%d p99_us=%d max_us=%d mean_us=%.1f\n",
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end

-- The keyed row: a fresh Idempotency-Key on every request (BENCH_KEY_PREFIX is unique per run),
-- so each one claims and completes a key in the store; without it, the request above is reused.
local key_prefix = os.getenv("BENCH_KEY_PREFIX")
if key_prefix and key_prefix ~= "" then
  local counter = 0
  function request()
    counter = counter + 1
    wrk.headers["Idempotency-Key"] = key_prefix .. counter
    return wrk.format()
  end
end
