"""A real `mlflow server` for tests (team mode): SQLite backend, proxied artifact store.

Fixtures (pulled into every test module by tests/conftest.py):

- `mlflow_server` (session): a running server on 127.0.0.1 at a free port, started once.
  `.uri`, `.port`, `.backend_uri`, `.artifacts_dir`, `.log_path`; `.stop(kill=False)` (the
  process ends, gracefully or by SIGKILL: connections are refused), `.start()` (again on the
  same port and store), `.pause()` / `.resume()` (SIGSTOP/SIGCONT: a hung server that accepts
  connections but never answers), `.running`. Tests that stop it must start it again (the
  `mlflow_uri` fixture also does).
- `mlflow_uri` (function): ensures the server runs and points `MLFLOW_TRACKING_URI` (and
  mlflow's in-process URI) at it for the test; restored afterwards.

Startup is ~3 s of CPU for the `mlflow` CLI plus ~3 s for the uvicorn worker that imports the
app (6–20 s wall on 2 busy cores). MLflow's job runner (huey consumers for GenAI jobs, seven
extra processes, ~10 s more) is switched off with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false,
and one worker process is enough. After each start a spare process imports the CLI and waits
(idle, ~150 MB); `start()` after a `stop()` lets it run `mlflow server` (the same command,
already imported), so a restart costs only the store check and the worker's startup.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

__all__ = ["MlflowServer", "mlflow_server", "mlflow_uri"]

_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# `python -c _LAUNCHER server ...` is `mlflow server ...`, with the import done before "go".
_LAUNCHER = (
    "import sys\n"
    "from mlflow.cli import cli\n"
    "if sys.stdin.readline().strip() != 'go':\n"
    "    sys.exit(0)\n"
    "sys.argv = ['mlflow'] + sys.argv[1:]\n"
    "cli()\n"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.host = "127.0.0.1"
        self.uri = f"http://{self.host}:{self.port}"
        self.backend_uri = f"sqlite:///{self.root / 'mlflow.db'}"
        self.artifacts_dir = self.root / "artifacts"
        self.log_path = self.root / "server.log"
        self.proc: subprocess.Popen | None = None
        self._spare: subprocess.Popen | None = None
        self.prewarm = True
        self.paused = False
        self.starts = 0
        self.last_start_s = 0.0

    # ------------------------------------------------------------------ lifecycle
    def args(self) -> list[str]:
        """The `mlflow` command line (what a user would type after `mlflow`)."""
        return [
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            str(self.artifacts_dir),
            "--serve-artifacts",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def _spawn(self) -> subprocess.Popen:
        """A process that has imported the `mlflow` CLI and waits for "go" on stdin before
        running `mlflow server ...`: restarts skip the CLI's import (about half the startup)."""
        env = dict(os.environ)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.pop("MLFLOW_TRACKING_URI", None)
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        log = open(self.log_path, "ab")
        try:
            return subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, *self.args()],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE,
                cwd=self.root,
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()

    def _kill_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None and spare.poll() is None:
            try:
                os.killpg(spare.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            spare.wait(10)

    def start(self, timeout: float = 120.0) -> None:
        if self.running:
            return
        t0 = time.monotonic()
        proc = self._spare if self._spare is not None and self._spare.poll() is None else self._spawn()
        self._spare = None
        self.proc = proc
        try:
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        except OSError:
            pass  # it died: reported below
        self.paused = False
        while True:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                self.proc = None
                raise RuntimeError(f"mlflow server exited during startup:\n{tail}")
            if self.healthy(0.5):
                break
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.1)
        self.starts += 1
        self.last_start_s = time.monotonic() - t0
        if self.prewarm and self._spare is None:
            self._spare = self._spawn()  # ready for the next restart (outage tests)

    def healthy(self, timeout: float = 1.0) -> bool:
        try:
            with _NO_PROXY_OPENER.open(f"{self.uri}/health", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the group we created: the CLI and its uvicorn worker
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15.0, kill: bool = False) -> None:
        """End the server (its whole process group); afterwards connections are refused.
        `kill=True`: SIGKILL, a crash (and quicker than uvicorn's graceful shutdown)."""
        if self.proc is None:
            return
        if self.paused:
            self._signal_group(signal.SIGCONT)
            self.paused = False
        self._signal_group(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(5)
        # the uvicorn child may outlive the CLI by a moment: wait until the port is free
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    pass
            except OSError:
                break
            self._signal_group(signal.SIGKILL)
            time.sleep(0.1)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc = None
        if self.prewarm and self._spare is None:
            self._spare = self._spawn()  # imports while the outage lasts; binds only on start()

    def close(self) -> None:
        """Stop the server and any waiting spare process (session teardown)."""
        self.prewarm = False
        self.stop()
        self._kill_spare()

    def pause(self) -> None:
        """Freeze the server: TCP connects still succeed (kernel backlog), requests hang."""
        self._signal_group(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)
        self.paused = False

    def __repr__(self) -> str:
        return f"MlflowServer({self.uri}, running={self.running})"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    if importlib.util.find_spec("mlflow") is None:  # e.g. the GPU machine: no mlflow there
        pytest.skip("mlflow is not installed")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    atexit.register(server.close)  # also when the session dies before teardown
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def mlflow_uri(mlflow_server, monkeypatch):
    """MLFLOW_TRACKING_URI (and mlflow's in-process tracking URI) -> the test server."""
    if mlflow_server.paused:
        mlflow_server.resume()
    if not mlflow_server.running:
        mlflow_server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(mlflow_server.uri)
    yield mlflow_server.uri
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        try:
            mlflow.set_tracking_uri(None)  # forget it; monkeypatch then restores the environment
        except Exception:
            pass
