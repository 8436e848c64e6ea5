"""Start a real ``tritonserver`` on loopback: the binary and Python backend bundled in the ``nvidia-pytriton``
wheel (installed with ``--no-deps``; it is used only for them), serving a model repository directly.

The Python backend's stub embeds the interpreter that comes first on ``PATH`` and loads ``libpython`` through the
dynamic linker, so the server gets this interpreter's ``bin`` first on ``PATH`` and its ``LIBDIR`` first on
``LD_LIBRARY_PATH``: the stub then runs in this environment (numpy 2, onnxruntime, this package).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

from ..errors import EnvironmentProblem

INSTALL_HINT = "pip install nvidia-pytriton==0.7.0 --no-deps (for its bundled tritonserver)"


def bundled_server() -> Optional[Path]:
    """The ``tritonserver`` folder inside the installed nvidia-pytriton wheel, or None."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_directory(root: Path, into: Path) -> Path:
    """A ``--backend-directory`` whose ``python/`` links the bundled backend, its utils and this Python's stub."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise EnvironmentProblem(f"the bundled Triton Python backend has no stub for Python {version}.")
    python = into / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in (root / "backends" / "python" / "libtriton_python.so",
                   root / "backends" / "python" / "triton_python_backend_utils.py", stub):
        target = python / source.name
        if not target.exists():
            target.symlink_to(source)
    return into


def server_environment(extra_pythonpath: Optional[Path] = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [libdir, env.get("LD_LIBRARY_PATH", "")] if p)
    if extra_pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(extra_pythonpath), env.get("PYTHONPATH", "")] if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _end_with_parent() -> None:
    """In the child before exec: the server gets SIGTERM when the thread that started it ends, even by SIGKILL of
    its process (a killed test run or bench leaves no server behind), so start it from a thread that outlives it.
    Linux only; elsewhere nothing."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class TritonServer:
    """A ``tritonserver`` child process on 127.0.0.1 with free ports; ``stop`` (or leaving the ``with``) ends it.

    ``log`` receives the server's stdout and stderr (a file path); ``started`` waits until the server is ready.
    """

    def __init__(self, repository: Path, log: Optional[Path] = None, startup_timeout: float = 120.0,
                 http_port: Optional[int] = None, grpc_port: Optional[int] = None):
        root = bundled_server()
        if root is None:
            raise EnvironmentProblem(f"no tritonserver binary found ({INSTALL_HINT}).")
        self.repository = Path(repository)
        self.root = root
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = free_port()
        self.startup_timeout = startup_timeout
        self._scratch = Path(tempfile.mkdtemp(prefix="sadtalker-rt-triton-"))
        self.log_path = Path(log) if log else self._scratch / "tritonserver.log"
        self.process: Optional[subprocess.Popen] = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        backends = backend_directory(self.root, self._scratch / "backends")
        return [str(self.root / "bin" / "tritonserver"), f"--model-repository={self.repository}",
                f"--backend-directory={backends}", "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}", "--metrics-address=127.0.0.1",
                f"--metrics-port={self.metrics_port}", "--exit-timeout-secs=5", "--log-verbose=0"]

    def start(self) -> "TritonServer":
        package_parent = Path(__file__).resolve().parents[2]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            env=server_environment(package_parent), start_new_session=True,
                                            preexec_fn=_end_with_parent)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EnvironmentProblem(f"tritonserver exited with code {self.process.returncode} while starting; "
                                         f"last lines of its log: {self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise EnvironmentProblem(f"tritonserver was not ready after {self.startup_timeout:.0f} s: {self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as answer:
                return answer.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """Ends the server at once (SIGKILL to its process group: the server and its backend stubs)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        else:            # the server is gone; its stubs may not be
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
