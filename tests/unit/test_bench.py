"""The benchmark's own checks: a missing or doubled message must fail the run, loudly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bench.loadgen import LoadResult, _payload, device_uid, readings_per_message
from bench.run import VerificationError, _latency, profile_summary, verify

T0 = datetime(2026, 11, 25, tzinfo=UTC)
RUN = "dr1234"


def _row(proc: int, seq: int, latency_ms: float = 10.0) -> tuple[str, float, datetime, datetime]:
    t = T0 + timedelta(milliseconds=seq)
    return device_uid(RUN, proc, seq % 7), float(seq), t + timedelta(milliseconds=latency_ms), t


def test_verify_accepts_each_acknowledged_message_stored_once() -> None:
    load = LoadResult(acked=[[0, 1, 2], [0, 1]])
    rows = [_row(0, 0), _row(0, 1), _row(0, 2), _row(1, 0), _row(1, 1)]
    assert verify(rows, load, RUN).startswith("ok: 5 acknowledged, 5 stored once each, 0 stored unacked")


def test_verify_fails_on_a_missing_message() -> None:
    load = LoadResult(acked=[[0, 1, 2], [0, 1]])
    rows = [_row(0, 0), _row(0, 2), _row(1, 0), _row(1, 1)]
    with pytest.raises(VerificationError, match=r"1 acknowledged messages missing \(e.g. \[\(0, 1\)\]\)"):
        verify(rows, load, RUN)


def test_verify_fails_on_a_doubled_message() -> None:
    load = LoadResult(acked=[[0, 1]])
    rows = [_row(0, 0), _row(0, 1), _row(0, 1)]
    with pytest.raises(VerificationError, match=r"1 stored more than once"):
        verify(rows, load, RUN)


def test_verify_reports_a_stored_message_whose_puback_was_lost() -> None:
    load = LoadResult(acked=[[0]])
    assert verify([_row(0, 0), _row(0, 1)], load, RUN).endswith("1 stored unacked")


def test_latency_percentiles_leave_out_the_warm_up() -> None:
    rows = [_row(0, s, latency_ms=1000.0 if s < 10 else float(s)) for s in range(110)]
    lat = _latency(rows, after=T0 + timedelta(milliseconds=10))
    assert lat["n"] == 100
    assert lat["p50"] == 60.0
    assert lat["max"] == 109.0


def test_payload_is_native_and_padding_adds_readings() -> None:
    plain = _payload("d", T0, 5, 0)
    assert plain == (b'{"device":"d","time":"2026-11-25T00:00:00+00:00","readings":{"seq":5,'
                     b'"temperature":{"value":50.5,"unit":"degF"}}}')
    assert len(_payload("d", T0, 5, 1024)) >= 1024
    assert readings_per_message(0) == 2
    assert readings_per_message(1024) > 2


def test_profile_summary_ranks_functions_by_own_samples(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text("main (a.py:1);work (a.py:5) 3\nmain (a.py:1);idle (b.py:9) 1\n")
    out = profile_summary(raw)
    assert out.splitlines()[2].split() == ["75.0", "75.0", "work", "a.py:5"]
    assert "100.0  main a.py:1" not in out  # main has no samples of its own



def test_fault_run_judgement_names_every_broken_limit() -> None:
    from bench.faults import judge

    ok = "ok: 10 acknowledged, 10 stored once each, 0 stored unacked"
    assert judge(hwm_mb=299.9, max_rss_mb=300, peak_unacked=4096, receive_maximum=4096, verified=ok,
                 service_exited=None) == []
    failures = judge(hwm_mb=300.5, max_rss_mb=300, peak_unacked=4097, receive_maximum=4096,
                     verified="FAILED: 1 acknowledged messages missing", service_exited="exit code 1")
    assert len(failures) == 4
    assert "300.5 MB is above the 300 MB limit" in failures[0]
    assert "reached 4097, above receive_maximum = 4096" in failures[1]
    assert judge(hwm_mb=1, max_rss_mb=300, peak_unacked=None, receive_maximum=4096, verified=ok,
                 service_exited=None) == ["sensor_ingest_messages_unacked was never read from /metrics"]
    assert judge(hwm_mb=1, max_rss_mb=300, peak_unacked=1, receive_maximum=4096, verified=ok, service_exited=None,
                 stop_exit_code=1) == ["the graceful stop after recovery exited 1, not 0"]


COUNT_BOUND = {"json, nested, max leaves, time_field", "json, gateway array of records",
               "preset shelly rpc, NotifyStatus of max leaves", "preset homeassistant (auto), flat JSON of max leaves",
               "lorawan, decoded payload of max leaves"}


def test_the_worst_case_payloads_fit_the_limit_and_meet_the_outcome_they_are_built_for() -> None:
    from bench.worst import _processor, cases
    from ingest.model import RawMessage

    limit, most = 65536, 2000
    processor = _processor(limit)
    outcomes = {}
    for name, (topic, payload) in cases(limit, most).items():
        assert len(payload) <= limit, name
        # Near the size limit, unless the count limit binds first (the leaf count is then at the limit).
        assert len(payload) > limit * 0.9 or name in COUNT_BOUND, f"{name}: a worst case should be near a limit"
        out = processor.process(RawMessage(topic, payload, datetime.now(UTC)))
        outcomes[name] = (out.rejection.reason if out.rejection and not out.readings else "stored", len(out.readings))
    assert outcomes["native map, max readings"] == ("stored", most)
    assert outcomes["over max readings (rejected)"][0] == "too_many_readings"
    assert outcomes["64 KiB of '[' (rejected, too_deep)"][0] == "too_deep"
    assert outcomes["64 KiB of binary (rejected, malformed)"][0] == "malformed"
    assert all(v[0] == "stored" for k, v in outcomes.items() if "rejected" not in k)
    assert outcomes["line, max lines, every one bad (rejected)"][0] == "malformed"
    assert outcomes["senml pack, a different unknown unit per record (rejected, bad_unit)"] == ("bad_unit", 0)
    assert outcomes["json, nested, max leaves, time_field"] == ("stored", 1990)
    assert outcomes["lorawan, decoded payload of max leaves"] == ("stored", 2000)
