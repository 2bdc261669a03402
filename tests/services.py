"""Private Mosquitto and PostgreSQL(+TimescaleDB) processes for the tests.

Each runs on a free 127.0.0.1 port with the project's own config files (deploy/mosquitto/mosquitto.conf,
deploy/postgres/postgresql.conf) and its data in a temporary directory, so the tests never use or
disturb the machine's own services. Both can be stopped and started again (fault tests).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[1]
SETUP_HINT = "run `make test` (it installs the services with deploy/local/services.sh install) or run that script"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll a condition. The timeout only bounds a hang: tests assert on conditions, not on time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f}s")
        time.sleep(interval)


async def until(condition: Callable[[], object], what: str, limit: float = 60.0) -> None:
    """The asyncio twin of wait_until: poll ``condition`` on the loop; ``limit`` only bounds a hang."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not condition():
        if loop.time() >= end:
            raise AssertionError(f"gave up waiting for {what} after {limit:.0f}s")
        await asyncio.sleep(0.01)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _service_user(name: str) -> tuple[int, int] | None:
    """(uid, gid) to run a server as when we are root (PostgreSQL refuses root), else None."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(name)
    except KeyError as exc:
        raise RuntimeError(f"running as root needs a {name!r} user; {SETUP_HINT}") from exc
    return pw.pw_uid, pw.pw_gid


def _chown_tree(path: Path, ids: tuple[int, int] | None) -> None:
    if ids is None:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, *ids)
        for f in files:
            os.chown(os.path.join(root, f), *ids)
        for d in dirs:
            os.chown(os.path.join(root, d), *ids)


def _pg_bindir() -> Path:
    pg_config = shutil.which("pg_config")
    candidates = []
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out:
            candidates.append(Path(out))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for c in candidates:
        if (c / "initdb").exists() and (c / "postgres").exists():
            return c
    raise RuntimeError(f"no PostgreSQL server binaries (initdb) found; {SETUP_HINT}")


class Postgres:
    """A private cluster: initdb in a temp dir, TimescaleDB preloaded, on a free port."""

    def __init__(self) -> None:
        self.bindir = _pg_bindir()
        self.ids = _service_user("postgres")
        self.dir = Path(tempfile.mkdtemp(prefix="sensor-ingest-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def _run_as(self) -> dict[str, object]:
        if self.ids is None:
            return {}
        uid, gid = self.ids
        return {"user": uid, "group": gid, "extra_groups": []}

    def init(self) -> None:
        self.data.mkdir()
        _chown_tree(self.dir, self.ids)
        subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
            check=True, capture_output=True, **self._run_as(),  # type: ignore[call-overload]
        )
        conf = (REPO / "deploy" / "postgres" / "postgresql.conf").read_text()
        with (self.data / "postgresql.conf").open("a") as f:
            f.write("\n# --- deploy/postgres/postgresql.conf ---\n" + conf)
            f.write(
                "\n# --- test cluster ---\n"
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\n"
                # Template databases can be copied only while no background worker is attached.
                "timescaledb.max_background_workers = 0\n"
                # Speed, not durability: these clusters live for one test session. The tests kill
                # the ingest process, never this server uncleanly.
                "fsync = off\nfull_page_writes = off\nshared_buffers = 128MB\n"
                "timescaledb.telemetry_level = off\n"
            )

    def start(self) -> None:
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.data)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            **self._run_as(),  # type: ignore[call-overload]
        )
        log.close()
        wait_until(self._ready, 60, f"PostgreSQL on port {self.port} (log: {self.dir / 'server.log'})")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"PostgreSQL exited: {(self.dir / 'server.log').read_text()[-2000:]}")
        try:
            with psycopg.connect(self.url("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self, sig: int = signal.SIGINT) -> None:
        """SIGINT is PostgreSQL's fast shutdown; SIGQUIT its immediate one."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)
        self.proc = None

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url("postgres"), autocommit=True)

    def create_database(self, template: str = "template1") -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        with self.admin() as c:
            c.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')  # type: ignore[arg-type]
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]

    def cleanup(self) -> None:
        self.stop(signal.SIGQUIT)
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass(frozen=True)
class BrokerTls:
    """A TLS listener for the test broker: PEM files and the client-certificate policy.

    ``ca_file`` is the CA that client certificates must chain to; ``cert_file`` / ``key_file`` are
    the broker's own certificate and key. ``use_identity_as_username``: the client certificate's CN
    becomes the username (what an ACL would see).
    """

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = True
    use_identity_as_username: bool = False


class Mosquitto:
    """A private broker with the project's config, persistence in a temp dir, on a free port."""

    def __init__(
        self,
        users: dict[str, str] | None = None,
        acl: str | Path | None = None,
        extra: str = "",
        tls: BrokerTls | None = None,
    ) -> None:
        """``users``: username -> password; when given, anonymous clients are refused.

        ``extra``: config lines appended last (they override the project's, e.g. message_size_limit).

        ``acl``: the broker's acl_file. A ``Path`` (e.g. deploy/mosquitto/acl.example, so a test proves
        the committed file) is copied as it is into the broker's directory; a ``str`` is the file's
        text, written there.

        ``tls``: also listen with TLS on ``tls_port`` (``tls_url``); the plain listener on ``port``
        stays. The files are copied into the broker's directory: Mosquitto 2.0, started as root,
        drops to its own user before it loads them, so it could not read a root-owned 0600 key
        elsewhere. Listener options in ``extra`` (those that follow a ``listener`` line) then apply to
        the TLS listener, which comes right before them.
        """
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise RuntimeError(f"mosquitto is not installed; {SETUP_HINT}")
        self.exe = exe
        self.ids = _service_user("mosquitto")
        self.dir = Path(tempfile.mkdtemp(prefix="sensor-ingest-mqtt-"))
        self.port = free_port()
        self.tls_port: int | None = free_port() if tls is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        (self.dir / "data").mkdir()
        conf = (REPO / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
        (self.dir / "mosquitto.conf").write_text(
            conf
            + "\n# --- test broker ---\n"
            + f"listener {self.port} 127.0.0.1\n"
            + (f"allow_anonymous false\npassword_file {self.dir}/passwd\n" if users else "allow_anonymous true\n")
            + (f"acl_file {self._acl_file(acl)}\n" if acl is not None else "")
            + f"persistence_location {self.dir}/data/\n"
            + f"log_dest file {self.dir}/mosquitto.log\nlog_type error\nlog_type warning\nlog_type notice\n"
            + (self._tls_listener(tls) if tls is not None else "")
            + extra
        )
        if users:
            passwd = self.dir / "passwd"
            passwd.touch()
            for user, password in users.items():
                subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b", str(passwd),
                                user, password], check=True, capture_output=True)
            passwd.chmod(0o600)
        _chown_tree(self.dir, self.ids)

    def _tls_listener(self, tls: BrokerTls) -> str:
        tls_dir = self.dir / "tls"
        tls_dir.mkdir()
        lines = [f"listener {self.tls_port} 127.0.0.1"]
        for key, source, name in (("cafile", tls.ca_file, "ca.crt"), ("certfile", tls.cert_file, "server.crt"),
                                  ("keyfile", tls.key_file, "server.key")):
            shutil.copyfile(source, tls_dir / name)
            lines.append(f"{key} {tls_dir / name}")
        (tls_dir / "server.key").chmod(0o600)
        lines.append(f"require_certificate {str(tls.require_certificate).lower()}")
        lines.append(f"use_identity_as_username {str(tls.use_identity_as_username).lower()}")
        return "\n".join(lines) + "\n"

    def _acl_file(self, acl: str | Path) -> Path:
        if isinstance(acl, Path):
            if not acl.is_file():
                raise FileNotFoundError(f"ACL file {acl.resolve()} does not exist")
            # Copied byte for byte (so the committed file is what is proven): Mosquitto drops to its own
            # user before it opens the file, and a checkout under a 0700 directory is closed to it.
            acl = acl.read_text()
        path = self.dir / "acl"
        path.write_text(acl)
        path.chmod(0o600)
        return path

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise RuntimeError("this broker has no TLS listener (pass tls=BrokerTls(...))")
        return f"mqtts://127.0.0.1:{self.tls_port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "mosquitto.log"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.dir / "mosquitto.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_until(self._ready, 30, f"Mosquitto on port {self.port}")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            log = self.dir / "mosquitto.log"
            raise RuntimeError(f"mosquitto exited: {log.read_text()[-2000:] if log.exists() else ''}")
        # Both listeners: the plain one may be open already when the TLS one fails to load its files.
        return port_open(self.port) and (self.tls_port is None or port_open(self.tls_port))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM saves the persistence file first; SIGKILL loses what was not saved."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)
        self.proc = None

    def cleanup(self) -> None:
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)
