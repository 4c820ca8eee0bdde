"""HTTP to the tracking server from the tracker's own threads: short timeouts, no urllib3
retries (a dead server must not stall training), and which failures are worth retrying."""

from __future__ import annotations

import contextlib
import math
import os
import threading

# these EnvironmentVariable objects; we give each a `get` that honours a thread-local
# override, so export's model registration etc. in the main thread keep MLflow's defaults.

_tls = threading.local()
_patch_lock = threading.Lock()
_patched = False


def install_overrides() -> bool:
    global _patched
    with _patch_lock:
        if _patched:
            return True
        try:
            from mlflow import environment_variables as ev

            pairs = (
                ("timeout", ev.MLFLOW_HTTP_REQUEST_TIMEOUT),
                ("max_retries", ev.MLFLOW_HTTP_REQUEST_MAX_RETRIES),
                ("backoff_factor", ev.MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR),
            )
            for name, var in pairs:
                orig = var.get

                def get(_orig=orig, _name=name):
                    ov = getattr(_tls, "http", None)
                    if ov is not None and _name in ov:
                        return ov[_name]
                    return _orig()

                var.get = get
        except Exception:  # an MLflow without these objects: fall back to environment defaults
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
            return False
        _patched = True
        return True


@contextlib.contextmanager
def limits(timeout: float, max_retries: int = 0):
    old = getattr(_tls, "http", None)
    _tls.http = {"timeout": max(1, int(math.ceil(timeout))), "max_retries": max_retries, "backoff_factor": 0}
    try:
        yield
    finally:
        _tls.http = old


def is_permanent(e: BaseException) -> bool:
    """A client-side fault (bad key/value, deleted run): retrying cannot help."""
    from mlflow.exceptions import MlflowException

    if not isinstance(e, MlflowException):
        return False
    try:
        code = int(e.get_http_status_code())
    except Exception:
        return False
    return 400 <= code < 500 and code not in (401, 403, 408, 429)


def one_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    for needle, short in (
        ("Connection refused", "connection refused"),
        ("Failed to establish a new connection", "connection refused"),
        ("Read timed out", "no answer (timeout)"),
        ("timed out", "no answer (timeout)"),
        ("Name or service not known", "unknown host"),
        ("Connection reset", "connection reset"),
        ("Connection aborted", "connection aborted"),
    ):
        if needle in s:
            return short
    return (s[:200] + "…") if len(s) > 200 else s
