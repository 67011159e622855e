"""The hand-kept counters and histograms expose what prometheus_client's own would."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from app.call import CallRecord
from app.metering.metrics import Metrics


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    metrics = Metrics()
    call = CallRecord(request_id="r", method="POST", path="/v1/chat/completions")
    call.status_code, call.attempts = 200, 2
    for seconds in (0.005, 0.007, 0.3, 400.0):
        metrics.observe_request("/v1/chat/completions", call, seconds)
    samples = _samples(metrics)
    route = ("route", "/v1/chat/completions")

    def bucket(le: str) -> float:
        return samples[("gateway_request_duration_seconds_bucket", tuple(sorted((("le", le), route))))]

    assert bucket("0.005") == 1  # a value on a bound counts in that bucket (le: less or equal)
    assert bucket("0.01") == 2
    assert bucket("0.25") == 2
    assert bucket("0.5") == 3
    assert bucket("300.0") == 3
    assert bucket("+Inf") == 4
    assert samples[("gateway_request_duration_seconds_count", (route,))] == 4
    assert samples[("gateway_request_duration_seconds_sum", (route,))] == 0.005 + 0.007 + 0.3 + 400.0
    assert samples[("gateway_requests_total", (route, ("status", "200")))] == 4
    assert samples[("gateway_upstream_attempts_total", (route,))] == 8
    assert ("gateway_time_to_first_byte_seconds_count", (route,)) not in samples
