"""`sensor-ingest replay`: quarantined messages re-run through the current configuration.

Replay works in batches, each one transaction: claim the oldest rows not yet replayed
(FOR UPDATE SKIP LOCKED: a concurrent replay takes other rows), process them, write their readings
in the same transaction (``Writer.write_in``, no new rejection rows), set each row's replayed_at and
its replay_reason / replay_detail (NULL when all of it is stored now), commit. A row is thus replayed
at most once, and an interrupted replay loses only its uncommitted batch, which the next run takes
again. too_large rows hold only the first ingest.max_message_bytes of their message: they are not
replayable, are counted as such and stay as they are (replayed_at NULL). The filters and the listing
are ingest.quarantine's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ingest.clikit import DatabaseUnavailable, client_settings, fail
from ingest.logs import mask_secrets
from ingest.quarantine import Filters

if TYPE_CHECKING:
    import asyncpg

    from ingest.process import Outcome, Processor
    from ingest.settings import Settings
    from ingest.store.writer import Conn, Writer

__all__ = ["ReplayTally", "Replayer", "open_pool", "run"]

_RETRIES = 5  # a batch that deadlocks with a concurrent writer (40P01, 40001) is taken again this often
_UNBOUNDED = 1 << 62  # new ids per minute for a replay: an operator's replay is not a flood
_MAX_ID = "SELECT coalesce(max(id), 0) FROM rejected_messages"
_COUNT = ("SELECT count(*) FILTER (WHERE reason <> 'too_large'), count(*) FILTER (WHERE reason = 'too_large')"
          " FROM rejected_messages WHERE replayed_at IS NULL AND id <= $1")
# The oldest rows first, so that a series' readings go in in time order; SKIP LOCKED: rows a concurrent
# replay holds are left to it.
_CLAIM = ("SELECT received_at, id, topic, payload FROM rejected_messages"
          " WHERE replayed_at IS NULL AND reason <> 'too_large' AND id <= $1{filters}"
          " ORDER BY received_at, id LIMIT $2 FOR UPDATE SKIP LOCKED")
# --dry-run reads without locking, page after page (keyset on the same order).
_PAGE = ("SELECT received_at, id, topic, payload FROM rejected_messages"
         " WHERE replayed_at IS NULL AND reason <> 'too_large' AND id <= $1"
         " AND ($3::timestamptz IS NULL OR (received_at, id) > ($3, $4)){filters}"
         " ORDER BY received_at, id LIMIT $2")
_MARK = """
UPDATE rejected_messages AS r SET replayed_at = now(), replay_reason = u.reason, replay_detail = u.detail
FROM unnest($1::timestamptz[], $2::bigint[], $3::text[], $4::text[]) AS u(received_at, id, reason, detail)
WHERE r.received_at = u.received_at AND r.id = u.id
"""


@dataclass(slots=True)
class ReplayTally:
    """What a replay did (or, dry, would do); only committed batches count."""

    dry_run: bool = False
    matching: int = 0  # replayable rows matching the filters, not yet replayed, at the start
    not_replayable: int = 0  # too_large rows among the matching ones: left as they are
    replayed: int = 0  # rows marked replayed
    batches: int = 0
    stored: int = 0  # new readings (and text states); dry run: valid readings, duplicates not known
    duplicates: int = 0  # readings already stored
    rows_stored: int = 0  # rows whose every reading is stored now
    skipped: Counter[str] = field(default_factory=Counter)  # rows with nothing to store, by why
    still: Counter[str] = field(default_factory=Counter)  # rows still (partly) refused, by the new reason
    partly: int = 0  # of those, rows that stored some readings
    interrupted: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "matching": self.matching, "not_replayable": self.not_replayable,
                "rows_replayed": self.replayed, "batches": self.batches,
                ("readings_valid" if self.dry_run else "readings_stored"): self.stored,
                **({} if self.dry_run else {"duplicates": self.duplicates}),
                "rows_stored": self.rows_stored, "rows_skipped": dict(self.skipped.most_common()),
                "rows_still_rejected": dict(self.still.most_common()), "rows_partly_stored": self.partly,
                "interrupted": self.interrupted}


def _skip_detail(o: Outcome) -> str:
    return (f"nothing to store: the current configuration skips this message ({o.skipped}"
            f"{f', source {o.source}' if o.source else ''})")


def _narrowed(o: Outcome, exc: BaseException) -> Outcome:
    """``o`` refused whole, as the pipeline does for a message whose data the database refuses."""
    from dataclasses import replace

    from ingest.model import Rejection
    from ingest.store.classify import classify, describe

    text = describe(exc)[:500]
    if classify(exc) == "data":
        state = getattr(exc, "sqlstate", None) or "none: refused by the driver"
        problem = Rejection("db_rejected", f"the database refused this message's data (SQLSTATE {state}): {text}")
    else:
        problem = Rejection("write_error", f"writing this message failed unexpectedly ({text}); report it")
    return replace(o, readings=[], rejection=problem, problems=[problem])


class Replayer:
    """The replay loop over one pool, one Processor and the selection ``filters``.

    ``run`` and ``dry_run`` take ``stop`` (asked before each batch: the `replay` command's Ctrl-C, a
    test's interruption) and ``on_batch`` (called after each commit with the tally so far)."""

    def __init__(self, pool: asyncpg.Pool, processor: Processor, settings: Settings, filters: Filters,
                 *, batch: int = 500) -> None:
        self.pool = pool
        self.processor = processor
        self.filters = filters
        self.batch = batch
        self.known_only = [s.name for s in settings.all_sources() if s.device_policy == "known"]
        self.upto = 0  # rows of higher id arrived after the start: not this run's (live ingest goes on)
        self.tally = ReplayTally()
        self.writer = self._writer()

    def _writer(self) -> Writer:
        from ingest.store.writer import Writer

        return Writer(self.pool, catalog=self.processor.catalog, known_only=self.known_only, alerts=None,
                      new_devices_per_minute=_UNBOUNDED, new_metrics_per_minute=_UNBOUNDED)

    async def count(self) -> ReplayTally:
        """Fix the selection (the rows there now) and count it: the progress bar's total."""
        conditions, params = self.filters.conditions(numbered=True, first=2)
        async with self.pool.acquire() as conn:
            self.upto = int(await conn.fetchval(_MAX_ID))
            counted = await conn.fetchrow(_COUNT + "".join(f" AND {c}" for c in conditions), self.upto, *params)
        assert counted is not None  # an aggregate has a row
        self.tally.matching, self.tally.not_replayable = int(counted[0]), int(counted[1])
        return self.tally

    async def bind_units(self, *, write: bool) -> None:
        """As the service at start-up: a stored series keeps its unit (Catalog.pin); ``write``: the
        metrics rows' bindings are brought up to the catalog too (ingest.store.ids.sync_bindings)."""
        from ingest.store.ids import sync_bindings

        catalog = self.processor.catalog
        if catalog is None:
            return
        async with self.pool.acquire() as conn:
            if write:
                await sync_bindings(conn, catalog)
            else:
                for name, unit in await conn.fetch("SELECT name, unit FROM metrics"):
                    catalog.pin(name, unit)

    async def run(self, *, stop: Callable[[], bool] = lambda: False,
                  on_batch: Callable[[ReplayTally], None] | None = None) -> ReplayTally:
        while not stop():
            if not await self._batch_with_retries():
                return self.tally
            if on_batch is not None:
                on_batch(self.tally)
        self.tally.interrupted = True
        return self.tally

    async def _batch_with_retries(self) -> bool:
        """A batch that deadlocked with a concurrent writer (another replay, live ingest on the same
        keys) was rolled back whole: it is taken again, a few times."""
        import asyncpg

        attempt = 0
        while True:
            try:
                return await self._batch()
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                attempt += 1
                if attempt > _RETRIES:
                    raise

    async def _batch(self) -> bool:
        """One transaction: claim, process, write, mark, commit. False when no row was left."""
        from ingest.model import RawMessage
        from ingest.validate import escape

        conditions, params = self.filters.conditions(numbered=True, first=3)
        sql = _CLAIM.format(filters="".join(f" AND {c}" for c in conditions))
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(sql, self.upto, self.batch, *params)
                if not rows:
                    return False
                outcomes = [self.processor.process(RawMessage(r["topic"], bytes(r["payload"]), r["received_at"]))
                            for r in rows]
                final, stored, duplicates = await self._write(conn, outcomes)
                marks = [(None, None) if o.rejection is None and o.skipped is None else
                         (None, escape(_skip_detail(o))) if o.rejection is None else
                         (o.rejection.reason, escape(o.rejection.detail)) for o in final]
                await conn.execute(_MARK, [r["received_at"] for r in rows], [r["id"] for r in rows],
                                   [m[0] for m in marks], [m[1] for m in marks])
        except BaseException:
            # The rolled-back transaction may have created devices or metrics the writer cached: a new
            # writer looks them up again.
            self.writer = self._writer()
            raise
        self._count(final, stored, duplicates)
        await self.writer.touch_devices()
        return True

    async def _write(self, conn: Conn, outcomes: Sequence[Outcome]) -> tuple[list[Outcome], int, int]:
        """The outcomes as written, new readings, duplicates. A batch the database refuses for its data
        is narrowed to the message at fault, which is then refused whole (db_rejected, write_error),
        inside the same transaction: one such row cannot stop every replay at the same batch."""
        from ingest.store.classify import classify

        try:
            async with conn.transaction():  # a savepoint: the claim survives a refused write
                result = await self.writer.write_in(conn, outcomes, record_rejections=False)
            return list(result.outcomes), result.readings + result.states, result.duplicates
        except Exception as exc:
            if classify(exc) == "retry":
                raise
            if len(outcomes) == 1:
                return [_narrowed(outcomes[0], exc)], 0, 0
        final: list[Outcome] = []
        stored = duplicates = 0
        half = len(outcomes) // 2
        for part in (outcomes[:half], outcomes[half:]):
            f, s, d = await self._write(conn, part)
            final += f
            stored += s
            duplicates += d
        return final, stored, duplicates

    def _count(self, final: Sequence[Outcome], stored: int, duplicates: int) -> None:
        t = self.tally
        t.batches += 1
        t.replayed += len(final)
        t.stored += stored
        t.duplicates += duplicates
        for o in final:
            if o.rejection is not None:
                t.still[o.rejection.reason] += 1
                t.partly += bool(o.readings)
            elif o.skipped is not None:
                t.skipped[o.skipped] += 1
            else:
                t.rows_stored += 1

    async def dry_run(self, *, stop: Callable[[], bool] = lambda: False,
                      on_batch: Callable[[ReplayTally], None] | None = None) -> ReplayTally:
        """Decode and validate the selection, page after page, without writing or locking anything."""
        from ingest.model import RawMessage

        self.tally.dry_run = True
        conditions, params = self.filters.conditions(numbered=True, first=5)
        sql = _PAGE.format(filters="".join(f" AND {c}" for c in conditions))
        after: tuple[datetime | None, int] = (None, 0)
        while not stop():
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(sql, self.upto, self.batch, *after, *params)
            if not rows:
                return self.tally
            after = (rows[-1]["received_at"], rows[-1]["id"])
            outcomes = [self.processor.process(RawMessage(r["topic"], bytes(r["payload"]), r["received_at"]))
                        for r in rows]
            self._count(outcomes, sum(len(o.readings) for o in outcomes), 0)
            if on_batch is not None:
                on_batch(self.tally)
        self.tally.interrupted = True
        return self.tally


async def open_pool(settings: Settings) -> asyncpg.Pool:
    """The replay's pool (two connections: the batches', and the last_seen update after each commit)."""
    import asyncpg

    from ingest.settings import mask_url
    from ingest.store.pool import create_pool

    try:
        return await create_pool(settings.database.model_copy(update={"pool_size": 2}), "sensor-ingest-replay")
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"cannot reach the database at {mask_url(settings.database.url)}: "
                                  f"{mask_secrets(str(exc) or type(exc).__name__)}") from None


def run(args: argparse.Namespace) -> int:
    """`sensor-ingest replay`."""
    settings = client_settings(args.config)  # the rules are not needed: replay raises no alerts
    return asyncio.run(_replay(args, settings))


async def _replay(args: argparse.Namespace, settings: Settings) -> int:
    import asyncpg

    from ingest.process import Processor
    from ingest.settings import mask_url
    from ingest.store.classify import describe

    processor = Processor.from_settings(settings)
    pool = await open_pool(settings)
    replayer = Replayer(pool, processor, settings, Filters.of(args), batch=args.batch)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    asked: list[int] = []

    def on_signal(sig: int) -> None:
        if asked and task is not None:
            task.cancel()  # a second Ctrl-C: now, the batch in progress rolls back
            return
        asked.append(sig)
        fail("stopping after the batch in progress commits (Ctrl-C again to stop now and roll it back)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    clean = False
    try:
        await replayer.count()
        await replayer.bind_units(write=not args.dry_run)
        with _Progress(replayer.tally, show=sys.stdout.isatty() and not args.json) as progress:
            go = replayer.dry_run if args.dry_run else replayer.run
            await go(stop=lambda: bool(asked), on_batch=progress.update)
        clean = True
    except asyncio.CancelledError:
        replayer.tally.interrupted = True
    except (asyncpg.UndefinedColumnError, asyncpg.UndefinedTableError):
        fail(f"the database at {mask_url(settings.database.url)} has an older schema than this release: run "
             "`sensor-ingest migrate`")
        return 2
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        replayer.tally.interrupted = True
        _summary(replayer.tally, args)
        raise DatabaseUnavailable(f"replay stopped: the database at {mask_url(settings.database.url)} failed "
                                  f"({mask_secrets(describe(exc))}); the batch in progress was rolled back, the "
                                  "committed ones are kept: run the same command again to resume") from None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if clean:
            await pool.close()
        else:
            pool.terminate()  # a connection may be stuck mid-statement; the server rolls its batch back
    _summary(replayer.tally, args)
    return 130 if replayer.tally.interrupted else 0


class _Progress:
    """A rich progress bar over the replayable rows counted at the start, when stdout is a terminal."""

    def __init__(self, tally: ReplayTally, show: bool) -> None:
        self._tally = tally
        self._bar: Any = None
        self._task: Any = None
        if show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("replaying" if not tally.dry_run else "checking"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("rows"), TimeRemainingColumn())

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task("rows", total=self._tally.matching)
        return self

    def update(self, tally: ReplayTally) -> None:
        if self._bar is not None:
            # Another replay may take some of the rows: the total grows with what this one found.
            self._bar.update(self._task, completed=tally.replayed, total=max(tally.matching, tally.replayed))

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _summary(t: ReplayTally, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(t.as_json(), indent=2, ensure_ascii=False))
        return
    if not (t.matching or t.replayed or t.not_replayable or t.interrupted):
        print(f"nothing to replay{Filters.of(args).shown()}: no matching row is waiting for a replay "
              "(`sensor-ingest rejected` lists the rows and their replay outcomes)")
        return
    verb = "would replay" if t.dry_run else "replayed"
    lines = [f"{verb} {t.replayed} row(s) of {t.matching} not yet replayed{Filters.of(args).shown()}, "
             f"in {t.batches} batch(es)"]
    figures: list[tuple[str, str]] = []
    if t.dry_run:
        figures.append(("readings valid", f"{t.stored} (duplicates, conflicts and device_policy = \"known\" are "
                        "checked only by a replay)"))
    else:
        figures.append(("readings stored (new)", str(t.stored)))
        figures.append(("duplicates", f"{t.duplicates} (already stored: a message partly stored the first time, "
                        "or a redelivered copy)"))
    figures.append(("rows stored", f"{t.rows_stored} (all of the row's readings{' would be' if t.dry_run else ''} "
                    "stored)"))
    if t.skipped:
        figures.append(("rows skipped", f"{t.skipped.total()} (nothing to store: "
                        f"{', '.join(f'{k} {n}' for k, n in t.skipped.most_common())})"))
    if t.still:
        figures.append(("rows still rejected", f"{t.still.total()} ({t.partly} of them partly stored), by new "
                        "reason: " + ", ".join(f"{k} {n}" for k, n in t.still.most_common())))
    if t.not_replayable:
        figures.append(("not replayable", f"{t.not_replayable} row(s) of reason too_large (only the first "
                        "ingest.max_message_bytes of each message were kept), left as they are"))
    lines += [f"  {label + ':':<23}{value}" for label, value in figures]
    if t.interrupted:
        lines.append("interrupted: the committed batches are kept; run the same command again to resume")
    elif t.dry_run:
        lines.append("dry run: nothing was written")
    print("\n".join(lines))
