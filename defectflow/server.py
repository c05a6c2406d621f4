"""Start Prefect's local API server early, so its start-up overlaps ours.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server the first
time a flow runs, and waits for it: ~8 s on a 2-core machine, spent after
our own imports (~7 s for torch, Prefect, MLflow). Starting the same server
process first (the command Prefect's ``SubprocessASGIServer`` runs) and
importing while it boots saves most of one of the two. Any problem here
falls back to Prefect's own start.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

_process: subprocess.Popen | None = None


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when our process dies, even when killed (no atexit)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_early() -> bool:
    """Spawn the temporary API server unless one is configured or Prefect is already loaded."""
    global _process
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules or _process is not None:
        return False
    spec = importlib.util.find_spec("prefect")
    if spec is None or not spec.submodule_search_locations:
        return False
    port = _free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    _process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir",
         str(Path(list(spec.submodule_search_locations)[0]).parent),
         "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    # At exit, signal the server and do not wait for its graceful shutdown (~2 s).
    atexit.register(stop, False)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    return True


def wait_ready(timeout: float = 180.0) -> None:
    """Block until the early server answers; on failure let Prefect start its own."""
    if _process is None:
        return
    url = os.environ["PREFECT_API_URL"] + "/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    stop()
    raise RuntimeError("the local Prefect API server did not start; set PREFECT_API_URL "
                       "to a running server (prefect server start) or retry")


def stop(wait: bool = True) -> None:
    global _process
    if _process is not None:
        _process.terminate()
        if wait:
            try:
                _process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _process.kill()
                _process.wait()
        _process = None
