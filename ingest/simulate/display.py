"""The live progress table and the end-of-run summary of `sensor-ingest simulate` (rich)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from ingest.simulate.patterns import HANOI
from ingest.simulate.tally import Tally

__all__ = ["print_summary", "progress_renderable", "summary_renderable"]


def _counts(title: str, column: str, rows: dict[str, dict[str, int]], extra: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", expand=False, show_edge=False, pad_edge=False)
    table.add_column(column, no_wrap=True)
    if extra:
        table.add_column(extra, justify="right")
    table.add_column("published", justify="right")
    table.add_column("acked", justify="right")
    for name, row in rows.items():
        cells = [name] + ([str(row.get(extra, 0))] if extra else []) + [str(row["published"]), str(row["acked"])]
        table.add_row(*cells)
    return table


def progress_renderable(
    tally: Tally, *, elapsed: Callable[[], float], fleet_time: Callable[[], datetime], rate: float,
    broker: str, silenced: Callable[[], list[str]], clock_label: str = "fleet clock",
) -> Callable[[], Group]:
    """A function rich.live.Live calls on each refresh to draw the current state.

    ``fleet_time`` is the fleet clock live, or the time of the latest message in a backfill
    (``clock_label`` says which).
    """

    def render() -> Group:
        seconds = max(elapsed(), 1e-9)
        head = Table.grid(padding=(0, 2))
        head.add_column(style="bold")
        head.add_column()
        head.add_row("broker", broker)
        head.add_row("elapsed", f"{seconds:,.1f} s")
        head.add_row(clock_label, fleet_time().astimezone(HANOI).strftime("%Y-%m-%d %H:%M:%S (Hanoi)"))
        head.add_row("published", f"{tally.published:,}  ({tally.published / seconds:,.1f}/s, asked {rate:g}/s)")
        head.add_row("acked", f"{tally.acked:,}  (in flight {tally.in_flight:,})")
        if tally.refused or tally.sent_qos0:
            head.add_row("refused / QoS 0", f"{tally.refused:,} / {tally.sent_qos0:,}")
        if tally.skipped:
            head.add_row("not sent", f"gap {tally.skipped_total('gap'):,}, dropped {tally.skipped_total('dropped'):,}")
        if tally.no_subscribers:
            head.add_row(Text("no subscriber", style="yellow"),
                         f"{tally.no_subscribers:,} acked messages had none: is the service running with "
                         "these sources?")
        faults = tally.group("faults")
        quiet = silenced()
        fault_table = _counts("Faults injected", "fault", faults)
        if quiet:
            fault_table.add_row("silent", f"{len(quiet)} device(s)", "-")
        return Group(head, Text(""), _counts("Families", "family", tally.group("families")), Text(""),
                     _counts("Kinds", "kind", tally.group("kinds")), Text(""), fault_table)

    return render


def summary_renderable(summary: dict[str, Any]) -> Group:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("seed / prefix", f"{summary['seed']} / {summary['prefix']}")
    head.add_row("elapsed", f"{summary['elapsed_s']:,.1f} s")
    head.add_row("devices", f"{summary['devices']:,}")
    head.add_row("published", f"{summary['published']:,}")
    head.add_row("acked", f"{summary['acked']:,}")
    head.add_row("refused", f"{summary['refused']:,} {summary['refused_reasons'] or ''}".rstrip())
    head.add_row("sent at QoS 0", f"{summary['sent_qos0']:,}")
    head.add_row("unanswered", f"{summary['unanswered']:,}")
    if summary["no_subscribers"]:
        head.add_row(Text("no subscriber", style="yellow"),
                     f"{summary['no_subscribers']:,} acked messages reached nobody: was the service running, "
                     "with sources for this prefix (--print-sources)?")
    if summary["silenced"]:
        head.add_row("silenced", ", ".join(summary["silenced"]))
    window = summary.get("backfill")
    if window:
        head.add_row("backfill", f"{window['start']} .. {window['end']}, every {window['interval']:g} s: "
                     f"{window['expected']:,} messages expected per device")
    if "per_device" in summary:
        head.add_row("not sent", f"gap {summary['gap']:,}, dropped {summary['dropped']:,}")
    faults = {k: v for k, v in summary["faults"].items() if "published" in v}
    parts: list[RenderableType] = [
        Text("sensor-ingest simulate: summary", style="bold"), head, Text(""),
        _counts("Families", "family", summary["families"], extra="devices"), Text(""),
        _counts("Kinds", "kind", summary["kinds"], extra="devices"), Text(""),
        _counts("Faults injected", "fault", faults), Text(""),
        _counts("Fault variants", "variant", summary["variants"]),
    ]
    if "per_device" in summary:
        parts += [Text(""), _scripted(summary["per_device"], expected=bool(window))]
    return Group(*parts)


def _scripted(per_device: dict[str, dict[str, Any]], *, expected: bool) -> Table:
    """The devices that lost messages to the script (or went silent): what a completeness check must find."""
    columns = (["expected"] if expected else []) + ["published", "acked", "gap", "dropped", "silent"]
    table = Table(title="Devices with gaps, drops or silence", title_justify="left", expand=False, show_edge=False,
                  pad_edge=False)
    table.add_column("device", no_wrap=True)
    for column in columns:
        table.add_column(column, justify="right")
    for uid, row in per_device.items():
        if row["gap"] or row["dropped"] or row["silent"]:
            table.add_row(uid, *(f"{row[c]:,}" for c in columns))
    return table


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    console.print(summary_renderable(summary))
