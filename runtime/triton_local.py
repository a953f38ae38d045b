"""A real Triton Inference Server on this machine's loopback, for tests, load measurements and trying a repository.

The server comes from the ``nvidia-pytriton`` wheel (PyPI), which carries a
``tritonserver`` binary (2.51) with the Python backend only: ``cvig export
--triton-backend python`` repositories load in it. It lives in its own
virtual environment (:data:`SERVER_REQUIREMENTS`, pinned; numpy < 2, which its
Python backend needs), made with pip by :func:`ensure_env`, never in the
project's environment. :class:`LocalTriton` starts it bound to 127.0.0.1 on
free ports, waits until it is ready and stops it by PID::

    python -m clustervig.runtime.triton_local setup              # once: build/triton-env
    python -m clustervig.runtime.triton_local serve REPO         # until Ctrl-C

    with LocalTriton(repo) as server:
        server.http_url, server.grpc_url, server.metrics()
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import click

ROOT = Path(__file__).resolve().parents[1]
SERVER_REQUIREMENTS = ("nvidia-pytriton==0.7.0", "numpy==1.26.4", "onnxruntime==1.32.0")
ENV_VAR = "CVIG_TRITON_ENV"


class TritonSetupError(RuntimeError):
    """The server environment cannot be made or the server does not start; the message says why."""


def default_env() -> Path:
    """``$CVIG_TRITON_ENV``, else ``build/triton-env`` of the checkout (or of the user's cache)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    build = ROOT / "build"
    try:
        build.mkdir(exist_ok=True)
        if os.access(build, os.W_OK):
            return build / "triton-env"
    except OSError:
        pass
    return Path.home() / ".cache" / "clustervig" / "triton-env"


def _env_python(env: Path) -> Path:
    return env / "bin" / "python"


def _marker(env: Path) -> Path:
    return env / "cvig-triton-env.json"


def ensure_env(env: Optional[Path] = None, quiet: bool = False, timeout: float = 900) -> Path:
    """The server environment at ``env`` (default :func:`default_env`), made with pip on first use.

    A marker file records the pins it was made with; other pins or a broken
    environment are made afresh. Concurrent callers wait on a lock file.
    Raises :class:`TritonSetupError` with pip's output when the install fails.
    """
    env = Path(env) if env is not None else default_env()
    env.parent.mkdir(parents=True, exist_ok=True)
    want = {"requirements": list(SERVER_REQUIREMENTS), "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    with open(env.parent / f".{env.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if json.loads(_marker(env).read_text()) == want and server_files(env):
                return env
        except (OSError, ValueError, TritonSetupError):
            pass
        shutil.rmtree(env, ignore_errors=True)
        if not quiet:
            print(f"[cvig] making the Triton server environment {env} (pip: {' '.join(SERVER_REQUIREMENTS)}; "
                  "about a minute, once)", file=sys.stderr, flush=True)
        steps = [[sys.executable, "-m", "venv", str(env)],
                 [str(_env_python(env)), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--only-binary",
                  ":all:", *SERVER_REQUIREMENTS]]
        for cmd in steps:
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                shutil.rmtree(env, ignore_errors=True)
                raise TritonSetupError(f"{' '.join(cmd)} took more than {timeout:.0f} s") from None
            if res.returncode != 0:
                shutil.rmtree(env, ignore_errors=True)
                out = "\n".join(line for line in (res.stdout + res.stderr).splitlines()
                                if not line.startswith("WARNING: Location"))
                raise TritonSetupError(f"{' '.join(cmd[:4])} ... failed (exit {res.returncode}):\n{out[-3000:]}")
        server_files(env)  # the wheel's layout is the one this module knows
        _marker(env).write_text(json.dumps(want) + "\n")
    return env


def server_files(env: Path) -> Dict[str, Path]:
    """Paths inside the wheel: the binary, its libraries, the Python backend and the stub for this Python."""
    lib = env / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    dist = lib / "pytriton" / "tritonserver"
    files = {
        "binary": dist / "bin" / "tritonserver",
        "libs": lib / "nvidia_pytriton.libs",
        "python_backend": dist / "backends" / "python",
        "stub": dist / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub",
    }
    missing = [f"{k} ({p})" for k, p in files.items() if not p.exists()]
    if missing:
        raise TritonSetupError(f"the server environment {env} lacks {', '.join(missing)}: not the layout of "
                               f"{SERVER_REQUIREMENTS[0]} (remove {env} to make it afresh)")
    return files


def free_ports(n: int) -> List[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now (the kernel's choice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent():
    """A ``preexec_fn`` asking Linux to send the child SIGTERM when the thread that started it ends
    (``PR_SET_PDEATHSIG``): a wrapper killed with SIGKILL (no handler can run) still stops its server, which
    then stops its backend stubs. None where prctl is unavailable or off the main thread (the signal follows
    the starting thread, not the process)."""
    import threading

    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: no imports, no allocation-heavy work
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:  # the parent died before prctl: nobody will stop us
            os._exit(1)

    return preexec


OWNER_FILE = "cvig-owner.pid"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead too (its parent has not reaped it yet)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_work_folders(tmp: Optional[Path] = None) -> List[Path]:
    """Remove the work folders (``cvig-triton-*``) that servers of dead wrappers left behind: a wrapper killed
    with SIGKILL cannot clean up, so the next start does. Only folders whose recorded owner is not running."""
    removed = []
    for d in Path(tmp or tempfile.gettempdir()).glob("cvig-triton-*"):
        try:
            owner = int((d / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if d.is_dir() and d.stat().st_uid == os.getuid() and not _pid_alive(owner):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


class LocalTriton:
    """``tritonserver`` on 127.0.0.1 serving ``repo``: started on enter, stopped (by PID) on exit.

    The server runs in a process group of its own; :meth:`stop` ends the whole group (the server and its Python
    backend stubs) and removes the work folder. Started from the main thread, the server also gets SIGTERM when
    this process dies without stopping it (``PR_SET_PDEATHSIG``), and the work folders of dead owners are
    removed by the next start."""

    def __init__(self, repo: Path, env: Optional[Path] = None, start_timeout: float = 120,
                 extra_args: Sequence[str] = ()) -> None:
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise TritonSetupError(f"model repository {self.repo} is not a folder")
        self.env = Path(env) if env is not None else default_env()
        self.start_timeout = start_timeout
        self.extra_args = list(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self.work: Optional[Path] = None
        self.http_port = self.grpc_port = self.metrics_port = 0

    # -- addresses ---------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def log(self) -> str:
        try:
            return (self.work / "server.log").read_text(errors="replace") if self.work else ""
        except OSError:
            return ""

    # -- life cycle --------------------------------------------------------
    def start(self) -> "LocalTriton":
        files = server_files(self.env)
        remove_stale_work_folders()
        self.work = Path(tempfile.mkdtemp(prefix="cvig-triton-"))
        (self.work / OWNER_FILE).write_text(str(os.getpid()))
        backend = self.work / "backends" / "python"
        backend.mkdir(parents=True)
        for f in files["python_backend"].iterdir():
            (backend / f.name).symlink_to(f)
        shutil.copy2(files["stub"], backend / "triton_python_backend_stub")  # the stub of this Python version
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        pylib = subprocess.run([str(_env_python(self.env)), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                               capture_output=True, text=True).stdout.strip()
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(files["libs"]), pylib, env.get("LD_LIBRARY_PATH", "")) if p)
        env["PATH"] = f"{self.env / 'bin'}:{env.get('PATH', '')}"  # the backend stub's python3
        env.pop("PYTHONPATH", None)
        cmd = [str(files["binary"]), f"--model-repository={self.repo}", f"--backend-directory={self.work / 'backends'}",
               "--http-address=127.0.0.1", f"--http-port={self.http_port}",
               "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
               "--allow-metrics=true", "--allow-gpu-metrics=false", "--metrics-address=127.0.0.1",
               f"--metrics-port={self.metrics_port}", "--metrics-interval-ms=200",
               "--exit-on-error=true", "--strict-readiness=true", "--log-verbose=0", *self.extra_args]
        log = open(self.work / "server.log", "wb")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.work,
                                         start_new_session=True, preexec_fn=_die_with_parent())
        finally:
            log.close()
        try:
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    tail = self.log()[-4000:]
                    raise TritonSetupError(f"tritonserver exited with code {self.proc.returncode} while loading "
                                           f"{self.repo}:\n{tail}")
                if self.ready():
                    return self
                time.sleep(0.2)
            raise TritonSetupError(f"tritonserver was not ready after {self.start_timeout:.0f} s:\n{self.log()[-4000:]}")
        except BaseException:  # not ready, or interrupted (Ctrl-C, a signal) while waiting: nothing stays behind
            self.stop()
            raise

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def metrics(self) -> str:
        """The Prometheus text of the metrics port."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return r.read().decode()

    def stop(self, timeout: float = 20) -> Optional[int]:
        """SIGTERM to the server's process group (the server and its backend stubs), SIGKILL after
        ``timeout`` s; returns the exit code. The work folder goes too."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
            code = self.proc.returncode
            try:  # stubs that outlived the server
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
        return code

    def __enter__(self) -> "LocalTriton":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def metric_values(text: str, name: str) -> Dict[str, float]:
    """``{labels: value}`` of one metric family in Prometheus text (labels as written, '' for none)."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            labels = head[len(name):].strip()
            out[labels] = float(value)
    return out


# ----------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def command():
    """A Triton Inference Server on loopback (nvidia-pytriton's tritonserver, Python backend) in its own
    environment: for repositories written by `cvig export --triton-backend python`."""


@command.command("setup")
@click.option("--env", "env", type=click.Path(path_type=Path), default=None,
              help=f"Environment folder (default: ${ENV_VAR} or build/triton-env).")
def setup_cmd(env):
    """Make the server environment with pip (pinned: nvidia-pytriton, numpy<2, onnxruntime)."""
    try:
        path = ensure_env(env)
    except TritonSetupError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Triton server environment: {path}")


class _Stopped(BaseException):
    """A termination signal received by ``serve``: unwinds to its cleanup like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = ("SIGTERM", "SIGHUP", "SIGQUIT")


@command.command("serve")
@click.argument("repo", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--env", "env", type=click.Path(path_type=Path), default=None,
              help=f"Environment folder (default: ${ENV_VAR} or build/triton-env; made on first use).")
def serve_cmd(repo, env):
    """Serve REPO on 127.0.0.1 until Ctrl-C or any termination signal.

    \b
    Example:
      cvig export --model cvig_nano --dynamic-batch 1:4:8 --triton-repo repo --triton-backend python -o out
      python -m clustervig.runtime.triton_local serve repo

    \b
    However this command ends (Ctrl-C, kill, SIGHUP when its terminal closes,
    SIGQUIT) it stops the server's process group (the server and its Python
    backend stubs) and removes its temporary folder; exit status 128 + the
    signal's number (130 for Ctrl-C). Killed with SIGKILL, it cannot: the
    server then gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and stops its
    stubs, and the next serve removes the temporary folder left behind.
    """
    def stop_on(signum, frame):
        raise _Stopped(signum)

    previous = {signal.SIGINT: signal.getsignal(signal.SIGINT)}  # restored as it was (ignored under nohup ... &)
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, stop_on)
    server = None
    code = 0
    try:
        try:
            env = ensure_env(env)
            server = LocalTriton(repo, env).start()
        except TritonSetupError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"tritonserver (PID {server.pid}) serving {repo}: HTTP {server.http_url}, gRPC {server.grpc_url}, "
                   f"metrics {server.metrics_url}; Ctrl-C stops it")
        while server.proc.poll() is None:
            time.sleep(0.5)
        click.echo(f"tritonserver exited with code {server.proc.returncode}:\n{server.log()[-2000:]}", err=True)
        code = 1
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except _Stopped as stop:
        code = 128 + stop.signum
    finally:
        for sig in previous:  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        if server is not None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    if code:
        if code > 128:
            click.echo(f"stopped by {signal.Signals(code - 128).name}: tritonserver and its stubs stopped, "
                       "temporary folder removed", err=True)
        sys.exit(code)


if __name__ == "__main__":
    command()
