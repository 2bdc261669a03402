"""The asyncpg pool of the ingest path: timeouts everywhere, UTC sessions, TCP keepalives, no reset round trip."""

from __future__ import annotations

from urllib.parse import quote, unquote, urlsplit

import asyncpg

from ingest.settings import DatabaseSettings

__all__ = ["create_pool", "dsn_of", "with_password"]


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(unquote(user), safe='')}:{quote(password, safe='')}@{host}"  # user as written: encoded
    if parts.port:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def dsn_of(settings: DatabaseSettings) -> str:
    if settings.password is not None:
        return with_password(settings.url, settings.password.get_secret_value())
    return settings.url


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A connection given back to the pool keeps its session as it is. asyncpg's default reset is a round
    trip on every release (advisory locks, cursors, LISTENs, settings: this code keeps none of them past
    a transaction: its locks are pg_advisory_xact_lock, its settings SET LOCAL, the dispatcher's LISTEN is
    removed before its connection goes back or the connection is closed). A transaction left open is
    still rolled back first: asyncpg does that before calling this, whatever ``reset`` is."""


async def create_pool(settings: DatabaseSettings, application_name: str = "sensor-ingest") -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn_of(settings),
        min_size=1,
        max_size=settings.pool_size,
        timeout=settings.connect_timeout,
        command_timeout=settings.command_timeout,
        max_inactive_connection_lifetime=300,
        reset=_keep_session,
        server_settings={
            "TimeZone": "UTC",
            "application_name": application_name,
            # The write path's locking (calibrations, alert holds) reads what the transaction it waited
            # for committed: that is READ COMMITTED, whatever the database's default is.
            "default_transaction_isolation": "read committed",
            # A statement that outlives this is abandoned by the server too, not only by us.
            "statement_timeout": str(int(settings.command_timeout * 1000)),
            # A transaction left idle that long is ended by the server. The writer never pauses that
            # long inside one; a client cut off behind something that keeps the server's side of the
            # connection alive (a proxy or load balancer: TCP keepalives are answered) does, and its
            # locks would hold every retry of the same rows until then.
            "idle_in_transaction_session_timeout": str(int(settings.command_timeout * 1000)),
            # The alert judge's lateral index reads get poor row estimates, for which JIT compiling
            # (hundreds of ms) costs far more than the few ms the queries take.
            "jit": "off",
            "tcp_keepalives_idle": "10",
            "tcp_keepalives_interval": "5",
            "tcp_keepalives_count": "3",
        },
    )
