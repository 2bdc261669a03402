"""Every reason a message, or some of its readings, is kept in rejected_messages: what it means and
how an operator fixes it. The one list: the README's "Rejection reasons" table is this table
(tests/unit/test_reasons.py compares them, and checks that every reason the code writes is here).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REASONS", "Reason", "markdown_table"]


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    meaning: str
    fix: str
    whole_message: bool = False  # the reason refuses the whole message (no reading of it can be stored)


REASONS: dict[str, Reason] = {r.code: r for r in (
    Reason("malformed", "not UTF-8, not JSON, or a JSON object with a duplicate key",
           "fix the publisher's encoder; check the source's `format`", whole_message=True),
    Reason("schema", "JSON of the wrong shape for the format; in line protocol, an integer out of range or two "
           "values for one series and time from lines with different tags",
           "check the source's `format` and options against the payload (`sensor-ingest decode`)"),
    Reason("empty", "no readings in the payload", "check the publisher; map the leaves that hold readings",
           whole_message=True),
    Reason("wrong_type", "a string where a number belongs (text goes in an explicit text slot)",
           "map the strings with `value_map`, or list the metric in `states`"),
    Reason("bad_time", "a time that cannot be read, without an offset and without a source `timezone`, before "
           "`earliest_time` or more than `max_future` ahead (under `time_policy = \"device\"`)",
           "set the device's clock (NTP); set `timezone`; or `time_policy = \"device_or_receive\"`"),
    Reason("not_finite", "NaN or ±Infinity (also `1e400`), or a value that a unit conversion takes past the "
           "float range", "fix the sensor or its driver"),
    Reason("bad_device", "a device id that is empty, longer than 200 characters, holds control characters, NUL "
           "or a lone UTF-16 surrogate, or is not in the source's `allow_devices`",
           "fix the publisher's id; or extend `allow_devices`"),
    Reason("bad_metric", "a metric name that is empty, longer than `ingest.max_metric_name_length`, holds "
           "control characters, NUL or a lone UTF-16 surrogate", "rename it in the source's mapping"),
    Reason("bad_text", "a text value or unit that PostgreSQL cannot store (NUL, lone surrogate) or a unit over "
           "32 characters", "fix the publisher; or set the unit in the source's mapping"),
    Reason("too_long", "a text value over 1,000 characters", "ignore the metric in the source's mapping"),
    Reason("too_large", "a payload over `ingest.max_message_bytes` (its first bytes are kept)",
           "split the message at the publisher, or raise the limit", whole_message=True),
    Reason("too_deep", "JSON nested deeper than `ingest.max_json_depth`, refused before parsing",
           "flatten the payload, or raise the limit", whole_message=True),
    Reason("too_many_readings", "more than `ingest.max_readings_per_message` readings in one message",
           "split the message at the publisher, or raise the limit", whole_message=True),
    Reason("too_many_lines", "more than `ingest.max_lines_per_message` lines in one line protocol message",
           "split the message at the publisher, or raise the limit", whole_message=True),
    Reason("too_many_new_series", "a new device id or metric name beyond its source's budget for the minute",
           "check the publisher for ids that change per message; raise `ingest.max_new_devices_per_minute` or "
           "`max_new_metrics_per_minute` for a real roll-out, then replay"),
    Reason("device_mismatch", "the payload names another device than the topic",
           "fix the device's topic or its id; a gateway source has no `{device}` in its topic",
           whole_message=True),
    Reason("no_device", "neither the topic nor the payload names a device",
           "capture `{device}` in the topic, or set `device_field`", whole_message=True),
    Reason("unknown_device", "a device not in the device register, from a source with `device_policy = \"known\"`",
           "add the device to the register (the devices table), then replay; or set `device_policy = "
           "\"register\"`"),
    Reason("no_source", "no source's topic template matches (a topic that a source's filter brings in but the "
           "source excludes is not a rejection: it is acknowledged and counted as skipped, `excluded`)",
           "add a `[[sources]]` entry for the topic, or stop publishing there", whole_message=True),
    Reason("unsupported", "a SenML version or must-understand field this service does not read",
           "publish SenML version 10 without must-understand fields", whole_message=True),
    Reason("bad_unit", "a unit that cannot be converted to the unit of the metric's quantity (the detail names "
           "both)", "fix the unit in the source's mapping (`metrics.<name>.unit`), or bind the metric to "
           "another quantity with `[[metrics]]`"),
    Reason("out_of_range", "a value outside its quantity's possible range, after conversion to the quantity's "
           "unit (outside the plausible range only, it is stored with the suspect flag)",
           "check the sensor and its unit; widen the range with `[[metrics]]` if the value is real"),
    Reason("conflict", "a different value for a (device, metric, time) already stored; the first value is kept, "
           "both are in the detail", "check the device's clock and whether two devices share an id"),
    Reason("decoder_error", "a decoder failed unexpectedly (a bug: report the payload)",
           "report the payload; it can be replayed once fixed", whole_message=True),
    Reason("db_rejected", "the database (or its driver) refused this one message's data, found by splitting "
           "the batch", "read the detail (the database's message); report it if the data looks valid",
           whole_message=True),
    Reason("write_error", "writing this one message failed unexpectedly (a bug: report it), found by splitting "
           "the batch", "report the detail and the payload", whole_message=True),
)}

def markdown_table() -> str:
    """The README's table: one row per reason."""
    lines = ["| reason | meaning | how to fix |", "|---|---|---|"]
    lines += [f"| `{r.code}` | {r.meaning} | {r.fix} |" for r in REASONS.values()]
    return "\n".join(lines)
