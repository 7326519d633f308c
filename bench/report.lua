-- wrk script: print one JSON line with the numbers bench/run.py needs.
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "errors": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration / 1e6, errors,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
