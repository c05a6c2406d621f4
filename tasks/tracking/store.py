"""The tracking store checked, and its schema created, before any compute.

``check_store`` proves the store is there and can be written, with a short timeout: an
unreachable PostgreSQL otherwise showed up only after the whole pipeline, through ~100 s of
MLflow's engine retries. ``prepare_store`` then lets MLflow create (or find) its tables under
an exclusive lock: three first runs on a fresh SQLite file at once otherwise raced in
alembic ("Online migration expected to match one row") and one lost its results.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import sqlite3
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

from ..errors import DefectflowError
from ..params import redacted_uri
from ..storage import os_problem, writable_folder

CONNECT_TIMEOUT_S = 5  # a reachable store answers in well under a second
_DATABASES = ("postgresql", "mysql", "mariadb", "mssql")
# Each driver's name for the connection timeout, in seconds.
_TIMEOUT_ARGS = {"postgresql": "connect_timeout", "mysql": "connect_timeout",
                 "mariadb": "connect_timeout", "mssql": "timeout"}


def _scheme(uri: str) -> str:
    return uri.split(":", 1)[0].split("+", 1)[0].lower()


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI (relative to the working folder, as SQLAlchemy reads
    it); None for an in-memory database."""
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return None if not database or database == ":memory:" else Path(database)


def check_store(uri: str, *, create: bool = True, min_free_gb: float = 0.0) -> None:
    """Raise a one-line ``DefectflowError`` naming the store unless it can be used now.

    ``create``: a SQLite file that does not exist yet may be created (``run``); without it
    the file must exist (looking up a model: a mistyped path must not become a new, empty
    database). Database servers are connected to once, tracking servers asked for their
    health, each within ``CONNECT_TIMEOUT_S`` seconds.
    """
    scheme = _scheme(uri)
    if scheme == "sqlite":
        _check_sqlite(uri, create, min_free_gb)
    elif scheme in _DATABASES:
        with _connection(uri):
            pass
    elif scheme in ("http", "https"):
        _check_server(uri)


def _check_sqlite(uri: str, create: bool, min_free_gb: float) -> None:
    path = sqlite_path(uri)
    if path is None:
        return
    if not path.exists():
        if not create:
            raise DefectflowError("no such SQLite file: a mistyped tracking URI? (nothing "
                                  "was created)", uri)
    elif not path.is_file():
        raise DefectflowError("the tracking store's path is not a file", uri)
    # SQLite writes its journal beside the database: the folder must be writable too.
    writable_folder(path.resolve().parent, f"tracking store {uri}: folder", min_free_gb)
    if not path.exists():
        return
    try:
        with open(path, "r+b"):
            pass
    except OSError as exc:
        raise DefectflowError(f"the SQLite file is not writable ({os_problem(exc)})",
                              uri) from None
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro",
                                                uri=True, timeout=CONNECT_TIMEOUT_S)) as db:
            db.execute("PRAGMA schema_version").fetchone()
    except sqlite3.Error as exc:
        raise DefectflowError(f"not a usable SQLite database ({exc})", uri) from None


@contextlib.contextmanager
def _connection(uri: str) -> Iterator:
    """One connection to a database server, opened within ``CONNECT_TIMEOUT_S`` seconds."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    scheme = _scheme(uri)
    try:
        engine = sqlalchemy.create_engine(
            uri, poolclass=NullPool, connect_args={_TIMEOUT_ARGS[scheme]: CONNECT_TIMEOUT_S})
    except (ImportError, sqlalchemy.exc.ArgumentError,
            sqlalchemy.exc.NoSuchModuleError) as exc:
        raise DefectflowError(f"cannot use this tracking URI ({exc}); a PostgreSQL store "
                              "needs `pip install defectflow[postgres]`",
                              redacted_uri(uri)) from None
    try:
        connection = engine.connect()
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise DefectflowError(f"tracking store not reachable ({reason})",
                              redacted_uri(uri)) from None
    try:
        yield connection
    finally:
        connection.close()
        engine.dispose()


def _check_server(uri: str) -> None:
    """An MLflow tracking server answers its health check."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S) as response:
            response.read(64)
    except urllib.error.HTTPError as exc:
        raise DefectflowError(f"tracking server answered {exc.code} {exc.reason} to /health",
                              redacted_uri(uri)) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DefectflowError(f"tracking server not reachable ({reason})",
                              redacted_uri(uri)) from None


@contextlib.contextmanager
def _init_lock(uri: str) -> Iterator[None]:
    """Held by one process at a time per store: a file lock beside a SQLite file (``<db>.lock``),
    an advisory lock on PostgreSQL and MySQL; none for a tracking server (it migrates itself)."""
    scheme = _scheme(uri)
    if scheme == "sqlite":
        path = sqlite_path(uri)
        if path is None:
            yield
            return
        path = path.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)  # as MLflow would for the database
        # The lock file stays: removing it would let a late process lock another inode.
        with open(f"{path}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    elif scheme in ("postgresql", "mysql", "mariadb"):
        import sqlalchemy

        key = zlib.crc32(b"defectflow-mlflow-schema")
        with _connection(uri) as connection:
            if scheme == "postgresql":
                connection.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({key})"))
            else:
                connection.execute(sqlalchemy.text(f"SELECT GET_LOCK('defectflow-{key}', 600)"))
            try:
                yield
            finally:
                unlock = (f"SELECT pg_advisory_unlock({key})" if scheme == "postgresql"
                          else f"SELECT RELEASE_LOCK('defectflow-{key}')")
                connection.execute(sqlalchemy.text(unlock))
    else:
        yield


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """MLflow's "Creating initial MLflow database tables..." lines would stand before a later
    one-line error: creating the tables is not news."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def prepare_store(uri: str) -> None:
    """Have MLflow create or upgrade the tracking and registry tables once, under the store's
    lock. MLflow keeps the store objects per process, so later clients reuse them."""
    import mlflow
    import sqlalchemy
    from mlflow.tracking import MlflowClient

    with _init_lock(uri), _quiet("mlflow.store.db.utils", "alembic"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        try:
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)
        except (mlflow.exceptions.MlflowException, sqlalchemy.exc.SQLAlchemyError, OSError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DefectflowError(f"tracking store not usable ({message})",
                                  redacted_uri(uri)) from None
