-- wrk: POST a chat completion with the gateway key; closed loop. BENCH_KEY, BENCH_BODY (a file).
-- With BENCH_STREAM=1 every response body is checked to end with "data: [DONE]".
-- done() prints one machine-readable line: BENCH_JSON {...}.
local key = os.getenv("BENCH_KEY") or "sk-bench"
local body_file = os.getenv("BENCH_BODY")
local f = assert(io.open(body_file, "rb"))
wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/v1/chat/completions"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key

local threads = {}
function setup(thread)
    table.insert(threads, thread)
end

bad = 0
if os.getenv("BENCH_STREAM") == "1" then
    function response(status, headers, body)
        if status ~= 200 or not string.find(body, "data: %[DONE%]%s*$") then
            bad = bad + 1
        end
    end
end

function done(summary, latency, requests)
    local b = 0
    for _, t in ipairs(threads) do
        b = b + (t:get("bad") or 0)
    end
    local e = summary.errors
    io.write(string.format(
        'BENCH_JSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
        '"write_errors":%d,"status_errors":%d,"timeouts":%d,"bad_streams":%d,' ..
        '"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
        summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout, b,
        latency:percentile(50), latency:percentile(99), latency.max))
end
