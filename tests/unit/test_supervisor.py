"""`sensor-ingest run --workers N` (ingest/supervisor.py): what each worker gets, what is refused, how the
flag and ingest.workers decide between one process and a supervisor, and the supervisor's loop.

The loop is run here on tiny real child processes (`python -c ...`) with short backoffs: exits,
restarts, the stop, a worker that ignores SIGTERM. The whole service under the supervisor, on the real
broker and database, is tests/integration/test_workers.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ingest import supervisor
from ingest.cli import main
from ingest.errors import ConfigError
from ingest.logs import setup_logging
from ingest.settings import Settings, load_settings
from ingest.supervisor import (
    STOP_TIMEOUT,
    Supervisor,
    WorkerPlan,
    client_id_of,
    describe_exit,
    http_addr_of,
    plan_workers,
    worker_command,
    worker_settings,
)
from tests.services import until

SOURCE = """
[[sources]]
name = "aq"
topic = "city/{device}/up"
format = "native"
"""


def _config(tmp_path: Path, mqtt: str = 'shared_group = "ingest"', http: str = "127.0.0.1:8080",
            ingest: str = "") -> Path:
    path = tmp_path / "ingest.toml"
    path.write_text(f'[mqtt]\nclient_id = "hn-ingest"\n{mqtt}\n[http]\naddr = "{http}"\n[ingest]\n{ingest}\n'
                    + SOURCE)
    return path


def _settings(tmp_path: Path, **kwargs: str) -> Settings:
    return load_settings(_config(tmp_path, **kwargs))


def _problems(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return {p.key: str(p) for p in exc.value.problems}


# --- what each worker gets ---------------------------------------------------------------------------


def test_worker_1_keeps_the_base_client_id_and_worker_k_appends_k() -> None:
    assert [client_id_of("hn-ingest", k) for k in (1, 2, 3, 10)] == [
        "hn-ingest", "hn-ingest-2", "hn-ingest-3", "hn-ingest-10"]


@pytest.mark.parametrize(("addr", "index", "expected"), [
    ("127.0.0.1:8080", 1, "127.0.0.1:8080"),
    ("127.0.0.1:8080", 3, "127.0.0.1:8082"),
    ("0.0.0.0:9000", 2, "0.0.0.0:9001"),
    ("[::1]:8080", 2, "[::1]:8081"),
    ("127.0.0.1:0", 5, "127.0.0.1:0"),  # ephemeral: each worker its own
])
def test_worker_k_listens_on_the_port_plus_k_minus_1_on_the_same_host(addr: str, index: int, expected: str) -> None:
    assert http_addr_of(addr, index) == expected


def test_the_plan_gives_every_worker_its_id_and_port(tmp_path: Path) -> None:
    plans = plan_workers(_settings(tmp_path), 3)
    assert plans == [WorkerPlan(1, "hn-ingest", "127.0.0.1:8080"), WorkerPlan(2, "hn-ingest-2", "127.0.0.1:8081"),
                     WorkerPlan(3, "hn-ingest-3", "127.0.0.1:8082")]


def test_a_worker_s_settings_differ_from_the_configured_only_in_client_id_and_http_address(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    mine = worker_settings(settings, 2)
    assert mine.mqtt.client_id == "hn-ingest-2"
    assert mine.http.addr == "127.0.0.1:8081"
    assert mine.mqtt.shared_group == "ingest"
    back = mine.model_copy(update={"mqtt": mine.mqtt.model_copy(update={"client_id": "hn-ingest"}),
                                   "http": mine.http.model_copy(update={"addr": "127.0.0.1:8080"})})
    assert back == settings
    assert worker_settings(settings, 1) == settings  # worker 1 is the configured service itself


def test_the_worker_command_carries_no_secret_and_names_the_config(tmp_path: Path) -> None:
    config = tmp_path / "ingest.toml"
    assert worker_command(config, 2) == [sys.executable, "-m", "ingest", "run", "--worker-index", "2",
                                         "--supervisor-pid", str(os.getpid()), "--config", str(config)]
    assert worker_command(None, 3, 77) == [sys.executable, "-m", "ingest", "run", "--worker-index", "3",
                                           "--supervisor-pid", "77"]


# --- refusals ----------------------------------------------------------------------------------------


def test_several_workers_without_a_shared_group_are_refused_with_the_reason_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        plan_workers(_settings(tmp_path, mqtt=""), 2, tmp_path / "ingest.toml", asked="--workers 2")
    problem = _problems(info)["mqtt.shared_group"]
    assert "is not set, and --workers 2 asks for 2 workers" in problem
    assert "the broker sends every message to every worker" in problem
    assert 'fix: set mqtt.shared_group (e.g. shared_group = "sensor-ingest" under [mqtt]' in problem
    assert str(tmp_path / "ingest.toml") in info.value.source


def test_a_client_id_too_long_for_the_last_worker_is_refused(tmp_path: Path) -> None:
    base = "x" * 126
    settings = _settings(tmp_path).model_copy(
        update={"mqtt": _settings(tmp_path).mqtt.model_copy(update={"client_id": base})})
    assert plan_workers(settings, 9)[-1].client_id == base + "-9"  # 128: the limit itself
    with pytest.raises(ConfigError) as info:
        plan_workers(settings, 10)
    problem = _problems(info)["mqtt.client_id"]
    assert "worker 10's client id (<mqtt.client_id>-10) would be 129 characters, above the 128" in problem
    assert "fix: shorten mqtt.client_id to at most 125 characters (it has 126)" in problem


def test_a_port_range_past_65535_is_refused_and_port_0_is_not(tmp_path: Path) -> None:
    assert plan_workers(_settings(tmp_path, http="127.0.0.1:65534"), 2)[-1].http_addr == "127.0.0.1:65535"
    with pytest.raises(ConfigError) as info:
        plan_workers(_settings(tmp_path, http="127.0.0.1:65534"), 3, asked="--workers 3")
    problem = _problems(info)["http.addr"]
    assert "--workers 3 asks for 3 workers, and worker k listens on port 65534 + k - 1" in problem
    assert "worker 3's port 65536 is past 65535" in problem
    assert "fix: choose a port of at most 65533, or port 0" in problem
    assert {p.http_addr for p in plan_workers(_settings(tmp_path, http="127.0.0.1:0"), 64)} == {"127.0.0.1:0"}


def test_every_problem_is_named_at_once(tmp_path: Path) -> None:
    settings = _settings(tmp_path, mqtt="", http="127.0.0.1:65535")
    settings = settings.model_copy(update={"mqtt": settings.mqtt.model_copy(update={"client_id": "y" * 128})})
    with pytest.raises(ConfigError) as info:
        plan_workers(settings, 2)
    assert set(_problems(info)) == {"mqtt.shared_group", "mqtt.client_id", "http.addr"}


def test_a_worker_checks_its_own_settings_again(tmp_path: Path) -> None:
    """The worker reads the file anew: one edited since the supervisor started is checked there too."""
    with pytest.raises(ConfigError) as info:
        worker_settings(_settings(tmp_path, mqtt=""), 2)
    assert "is not set, and this process is worker 2 of a supervisor" in _problems(info)["mqtt.shared_group"]
    with pytest.raises(ConfigError):
        worker_settings(_settings(tmp_path, mqtt=""), 1)


def test_the_workers_setting_is_bounded(tmp_path: Path) -> None:
    assert load_settings().ingest.workers == 1
    with pytest.raises(ConfigError) as info:
        load_settings(_config(tmp_path, ingest="workers = 0"))
    assert "ingest.workers" in _problems(info)
    with pytest.raises(ConfigError):
        load_settings(_config(tmp_path, ingest="workers = 65"))
    assert load_settings(_config(tmp_path, ingest="workers = 64")).ingest.workers == 64


# --- the flag, the setting, and which path runs -------------------------------------------------------


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch, _restore_logging: None) -> dict[str, Any]:
    """Which way `run` went: the service in-process (ingest.service.run_service) or the supervisor."""
    seen: dict[str, Any] = {}

    async def service(settings: Settings, config: Path | None = None, siblings: Sequence[str] = ()) -> int:
        seen["service"] = settings
        if siblings:
            seen["siblings"] = list(siblings)
        logging.getLogger("ingest.service").info("the service would run here")
        return 0

    def supervise(settings: Settings, config: Path | None, workers: int, *, asked: str | None = None) -> int:
        seen["supervisor"] = (workers, asked)
        return 0

    import ingest.service

    monkeypatch.setattr(ingest.service, "run_service", service)
    monkeypatch.setattr(supervisor, "supervise", supervise)
    return seen


def test_one_worker_runs_the_service_in_process_as_before(tmp_path: Path, ran: dict[str, Any]) -> None:
    assert main(["run", "--config", str(_config(tmp_path, mqtt=""))]) == 0
    assert "supervisor" not in ran
    assert ran["service"].mqtt.client_id == "hn-ingest"
    assert ran["service"].http.addr == "127.0.0.1:8080"


def test_ingest_workers_starts_the_supervisor(tmp_path: Path, ran: dict[str, Any]) -> None:
    assert main(["run", "--config", str(_config(tmp_path, ingest="workers = 2"))]) == 0
    assert ran == {"supervisor": (2, "ingest.workers = 2")}


def test_the_workers_flag_overrides_the_config(tmp_path: Path, ran: dict[str, Any]) -> None:
    config = str(_config(tmp_path, ingest="workers = 3"))
    assert main(["run", "--config", config, "--workers", "4"]) == 0
    assert ran.pop("supervisor") == (4, "--workers 4")
    assert main(["run", "--config", config, "--workers", "1"]) == 0
    assert ran.pop("service").mqtt.client_id == "hn-ingest"
    assert ran == {}


def test_the_environment_sets_ingest_workers(tmp_path: Path, ran: dict[str, Any],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENSOR_INGEST_INGEST__WORKERS", "2")
    assert main(["run", "--config", str(_config(tmp_path))]) == 0
    assert ran == {"supervisor": (2, "ingest.workers = 2")}


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_a_bad_workers_flag_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--workers", value])
    assert info.value.code == 2
    assert "--workers" in capsys.readouterr().err


@pytest.mark.usefixtures("_restore_logging")
def test_the_refusal_exits_2_and_says_what_to_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", str(_config(tmp_path, mqtt="")), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "sensor-ingest: invalid configuration: " in err
    assert "mqtt.shared_group: is not set, and --workers 2 asks for 2 workers" in err


@pytest.fixture
def _sighup_restored() -> Iterator[None]:
    old = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, old)


@pytest.mark.usefixtures("_sighup_restored")
def test_a_worker_runs_the_service_with_its_own_id_port_and_log_tag(
    tmp_path: Path, ran: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--config", str(_config(tmp_path)), "--worker-index", "2"]) == 0
    assert ran["service"].mqtt.client_id == "hn-ingest-2"
    assert ran["service"].http.addr == "127.0.0.1:8081"
    assert "INFO    [w2] ingest.service: the service would run here" in capsys.readouterr().err
    assert "siblings" not in ran  # how many workers there are was not said


def test_a_worker_knows_the_client_ids_of_its_siblings(tmp_path: Path, ran: dict[str, Any]) -> None:
    # As the supervisor starts it (worker_command): the others' sessions are waited for while they
    # drain a backlog (ingest.alerts.catchup).
    argv = worker_command(_config(tmp_path), 2, 1, workers=3)
    assert argv[-4:-2] == ["--workers", "3"]
    assert main(argv[3:]) == 0
    assert ran["siblings"] == ["hn-ingest", "hn-ingest-2", "hn-ingest-3"]


def test_the_help_of_run_explains_the_workers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for words in ("--workers N", "$share/<mqtt.shared_group>/<filter>", "mqtt.shared_group is required",
                  "<mqtt.client_id>-k", "http.addr + k - 1", "port 0: an ephemeral port each", "SIGTERM, SIGINT",
                  "SIGHUP forwarded to every worker", f"after {STOP_TIMEOUT:.0f} s is killed", "exits with code 2",
                  "Lowering N", "mqtt.session_expiry"):
        assert words in out, words


@pytest.mark.usefixtures("_restore_logging")
def test_worker_log_lines_say_which_worker(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "json", worker=3)
    logging.getLogger("ingest.test").info("hello")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert (line["worker"], line["msg"]) == (3, "hello")
    setup_logging("info", "text")
    logging.getLogger("ingest.test").info("alone")
    assert "INFO    ingest.test: alone" in capsys.readouterr().err


def test_the_stop_waits_longer_than_the_service_s_own_grace() -> None:
    from ingest.service import SHUTDOWN_GRACE

    assert STOP_TIMEOUT > SHUTDOWN_GRACE + 5


def test_exit_codes_in_words() -> None:
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(-15) == "was killed by SIGTERM"


# --- the supervisor's loop, on real child processes -----------------------------------------------------

# A worker that is ready once it has written its file, then waits; SIGTERM ends it with 0.
WAITER = """
import pathlib, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
{setup}
pathlib.Path(sys.argv[1]).write_text("ready")
while True:
    time.sleep(0.02)
"""


def _plans(n: int) -> list[WorkerPlan]:
    return [WorkerPlan(k, client_id_of("w", k), http_addr_of("127.0.0.1:0", k)) for k in range(1, n + 1)]


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ingest.supervisor"]


@pytest.mark.asyncio
async def test_a_dead_worker_is_started_again_with_a_doubling_wait(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    sup = Supervisor(_plans(1), lambda k: [sys.executable, "-c", "import sys; sys.exit(1)"],
                     backoff_first=0.05, backoff_max=0.2)
    task = asyncio.create_task(sup.run())
    await until(lambda: sup.starts >= 5, "five starts", 30)
    assert sup.slots[0].delay == 0.2  # 0.05, 0.1, 0.2, then capped
    sup.request_stop("test")
    assert await task == 0
    deaths = [m for m in _messages(caplog) if "exited with code 1" in m]
    assert len(deaths) >= 4
    assert "starting it again in 0.05s" in deaths[0]
    assert "starting it again in 0.1s" in deaths[1]
    assert all("starting it again in 0.2s" in m for m in deaths[3:])


@pytest.mark.asyncio
async def test_the_wait_starts_over_after_a_steady_run() -> None:
    sup = Supervisor(_plans(1), lambda k: [sys.executable, "-c", "import sys; sys.exit(1)"],
                     backoff_first=0.05, backoff_max=0.2, steady_after=0.0)
    task = asyncio.create_task(sup.run())
    await until(lambda: sup.starts >= 4, "four starts", 30)
    sup.request_stop("test")
    assert await task == 0
    assert sup.slots[0].delay == 0.1  # reset to 0.05 before each wait, doubled after it


@pytest.mark.asyncio
async def test_a_worker_ended_by_someone_else_is_started_again(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    ready = tmp_path / "ready"
    sup = Supervisor(_plans(1), lambda k: [sys.executable, "-c", WAITER.format(setup=""), str(ready)],
                     backoff_first=0.05)
    task = asyncio.create_task(sup.run())
    await until(ready.exists, "the worker", 30)
    first = sup.pids()[1]
    ready.unlink()
    os.kill(first, signal.SIGTERM)  # to the worker itself: it exits 0, but the supervisor did not ask
    await until(lambda: ready.exists() and sup.pids().get(1) not in (None, first), "a new worker", 30)
    sup.request_stop("test")
    assert await task == 0
    assert any(f"worker 1 (pid {first}) exited with code 0 without being asked to stop by the supervisor" in m
               for m in _messages(caplog))


@pytest.mark.asyncio
async def test_exit_code_2_stops_every_worker_and_the_supervisor_exits_2(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    ready = tmp_path / "ready"

    def command(k: int) -> list[str]:
        if k == 1:
            return [sys.executable, "-c", WAITER.format(setup=""), str(ready)]
        return [sys.executable, "-c", f"import pathlib, sys, time\nwhile not pathlib.Path({str(ready)!r}).exists(): "
                "time.sleep(0.02)\nsys.exit(2)"]

    sup = Supervisor(_plans(2), command, backoff_first=0.05)
    assert await asyncio.wait_for(sup.run(), 30) == 2
    assert sup.starts == 2  # worker 2 was not started again
    messages = _messages(caplog)
    assert any("worker 2 (pid" in m and "exited with code 2: the configuration or the database schema" in m
               for m in messages)
    assert any(m.startswith("worker 1 (pid") and m.endswith(" stopped") for m in messages)


@pytest.mark.asyncio
async def test_a_worker_that_ignores_sigterm_is_killed_after_the_stop_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ready = tmp_path / "ready"
    stubborn = WAITER.format(setup="signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    sup = Supervisor(_plans(1), lambda k: [sys.executable, "-c", stubborn, str(ready)], stop_timeout=0.5)
    task = asyncio.create_task(sup.run())
    await until(ready.exists, "the worker", 30)
    sup.request_stop("test")
    assert await asyncio.wait_for(task, 30) == 1
    messages = _messages(caplog)
    assert any("has not stopped 0.5s after SIGTERM: killing it" in m for m in messages)
    assert any("was killed by SIGKILL" in m for m in messages)


@pytest.mark.asyncio
async def test_sighup_is_forwarded_and_one_that_comes_too_early_only_restarts_the_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ready, hups = tmp_path / "ready", tmp_path / "hups"
    listening = WAITER.format(setup=f"signal.signal(signal.SIGHUP, lambda *_: open({str(hups)!r}, 'a').write('hup'))")
    early = WAITER.format(setup="")  # SIGHUP's default action: the process ends
    sup = Supervisor(_plans(2), lambda k: [sys.executable, "-c", listening if k == 1 else early,
                                           str(ready) + str(k)], backoff_first=60.0)
    task = asyncio.create_task(sup.run())
    await until(lambda: all(Path(f"{ready}{k}").exists() for k in (1, 2)), "both workers", 30)
    second = sup.pids()[2]
    assert sup.forward(signal.SIGHUP) == 2
    await until(lambda: hups.exists() and hups.read_text() == "hup", "worker 1 to get SIGHUP", 30)
    # Worker 2 ended of it; it is started again at once, not after the 60 s of a crash.
    await until(lambda: sup.pids().get(2) not in (None, second), "worker 2 again", 30)
    sup.request_stop("test")
    assert await asyncio.wait_for(task, 30) == 0
    assert any(f"worker 2 (pid {second}) was still starting when SIGHUP came" in m for m in _messages(caplog))
    assert sup.slots[1].delay == 60.0
