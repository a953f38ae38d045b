"""`python -m clustervig.runtime.triton_local serve`: however the wrapper ends, no server process, backend stub,
held port or temporary folder stays behind.

A fake server stands in for tritonserver so this runs everywhere: a program in a server environment of the
same layout (clustervig.runtime.triton_local.server_files) that answers the readiness probe on its HTTP port,
starts a "backend stub" child that ignores SIGTERM (only a kill of the process group ends it, as for a stub
stuck in a model), and on SIGTERM stops its stub and exits, as tritonserver does. The real server (pip
environment of tests/test_triton_server.py) is checked too where it can be installed.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clustervig.runtime import triton_local
from clustervig.runtime.triton_local import SERVER_REQUIREMENTS, _marker, server_files

FAKE_SERVER = r'''
import http.server, os, signal, subprocess, sys, threading
port = int(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--http-port=")))
stub = subprocess.Popen([sys.executable, "-c",
                         "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
if os.environ.get("FAKE_TRITON_PIDS"):
    with open(os.environ["FAKE_TRITON_PIDS"], "w") as f:
        f.write(f"{os.getpid()} {stub.pid} {port}\n")

def stop(signum, frame):  # tritonserver on SIGTERM: stops its stubs, exits
    stub.kill()
    stub.wait()
    os._exit(0)

signal.signal(signal.SIGTERM, stop)

class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/v2/health/ready" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Ready).serve_forever()
'''


def make_fake_env(env: Path) -> Path:
    """A server environment at ``env`` with the wheel's layout whose tritonserver is FAKE_SERVER (also used by
    tests/test_readme.py where the real server cannot be installed)."""
    env.mkdir(parents=True, exist_ok=True)
    (env / "bin").mkdir()
    (env / "bin" / "python").symlink_to(sys.executable)
    lib = env / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    dist = lib / "pytriton" / "tritonserver"
    (lib / "nvidia_pytriton.libs").mkdir(parents=True)
    (dist / "backends" / "python").mkdir(parents=True)
    (dist / "backends" / "python" / "libtriton_python.so").write_bytes(b"")
    stub = dist / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
    stub.parent.mkdir(parents=True)
    stub.write_bytes(b"")
    binary = dist / "bin" / "tritonserver"
    binary.parent.mkdir(parents=True)
    binary.write_text(f"#!{sys.executable}\n{FAKE_SERVER}")
    binary.chmod(0o755)
    want = {"requirements": list(SERVER_REQUIREMENTS), "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    _marker(env).write_text(json.dumps(want) + "\n")  # ensure_env takes it as made: no pip
    assert server_files(env)["binary"] == binary
    return env


@pytest.fixture(scope="module")
def fake_env(tmp_path_factory):
    return make_fake_env(tmp_path_factory.mktemp("fake") / "fake-triton-env")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (read from /proc, independently of the module under test)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture
def leftovers():
    """PIDs and process groups a test started: whatever survives the test (a failure) is killed afterwards."""
    started = {"pids": [], "groups": []}
    yield started
    for pgid in started["groups"]:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in started["pids"]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def port_free(port: int) -> bool:
    """Nothing listens on the port any more (connections in TIME_WAIT from the readiness probes may remain)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def gone(pids, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def start_serve(tmp_path: Path, env: Path, leftovers: dict, extra_env=None):
    """The wrapper as a user starts it, with its temporary folders under tmp_path/tmp; returns the process and
    the (server PID, stub PID, HTTP port) the fake server reported."""
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    pids = tmp_path / "pids"
    penv = dict(os.environ, TMPDIR=str(tmp), FAKE_TRITON_PIDS=str(pids), **(extra_env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "clustervig.runtime.triton_local", "serve", str(repo), "--env",
                             str(env)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=penv,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    leftovers["pids"].append(proc.pid)
    line = proc.stdout.readline()
    assert line.startswith("tritonserver (PID "), line + proc.stderr.read()
    server, stub, port = map(int, pids.read_text().split())
    leftovers["groups"].append(server)  # the server leads its own process group
    assert int(line.split("PID ")[1].split(")")[0]) == server
    assert alive(server) and alive(stub) and not port_free(port)
    work = list(tmp.glob("cvig-triton-*"))
    assert len(work) == 1 and (work[0] / "backends" / "python").is_dir()
    return proc, (server, stub, port), tmp


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT", "SIGQUIT"])
def test_a_terminated_wrapper_stops_its_server_and_cleans_up(tmp_path, fake_env, sig, leftovers):
    proc, (server, stub, port), tmp = start_serve(tmp_path, fake_env, leftovers)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + getattr(signal, sig), err
    assert f"stopped by {sig}: tritonserver and its stubs stopped, temporary folder removed" in err
    assert "Traceback" not in err
    assert gone([server, stub]) and port_free(port)
    assert list(tmp.glob("cvig-triton-*")) == []


def test_a_killed_wrapper_still_stops_its_server(tmp_path, fake_env, leftovers):
    """SIGKILL runs no handler: the kernel sends the server SIGTERM (PR_SET_PDEATHSIG), which stops its stub;
    the next serve removes the folder the dead wrapper left behind."""
    proc, (server, stub, port), tmp = start_serve(tmp_path, fake_env, leftovers)
    proc.kill()
    proc.wait(timeout=30)
    assert gone([server, stub]) and port_free(port)
    (left,) = list(tmp.glob("cvig-triton-*"))
    assert triton_local.remove_stale_work_folders(tmp) == [left] and not left.exists()
    # a live owner's folder is kept
    proc, (server, stub, _), tmp = start_serve(tmp_path, fake_env, leftovers)
    try:
        assert triton_local.remove_stale_work_folders(tmp) == [] and len(list(tmp.glob("cvig-triton-*"))) == 1
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert gone([server, stub]) and list(tmp.glob("cvig-triton-*")) == []


def test_interrupted_start_leaves_nothing(tmp_path, fake_env, leftovers):
    """A server that never gets ready: the start fails with the log, and the group and folder go."""
    slow = fake_env.parent / "slow-env"
    if not slow.exists():
        import shutil

        shutil.copytree(fake_env, slow, symlinks=True)
        binary = server_files(slow)["binary"]
        binary.write_text(binary.read_text().replace("http.server.HTTPServer(", "threading.Event().wait() or ("))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    os.environ["FAKE_TRITON_PIDS"] = str(tmp_path / "pids")
    try:
        server = triton_local.LocalTriton(tmp_path, slow, start_timeout=3)
        old = triton_local.tempfile.tempdir
        triton_local.tempfile.tempdir = str(tmp)
        try:
            with pytest.raises(triton_local.TritonSetupError, match="not ready after 3 s"):
                server.start()
        finally:
            triton_local.tempfile.tempdir = old
    finally:
        os.environ.pop("FAKE_TRITON_PIDS")
    pid, stub, port = map(int, (tmp_path / "pids").read_text().split())
    leftovers["groups"].append(pid)
    assert gone([pid, stub]) and list(tmp.glob("cvig-triton-*")) == []


@pytest.fixture(scope="module")
def real_env():
    try:
        return triton_local.ensure_env()
    except triton_local.TritonSetupError as exc:
        pytest.skip(f"the Triton server environment cannot be installed here: {exc}")


def _group(pgid: int):
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int(d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid and alive(int(d.name)):
                    pids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return pids


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_real_server_is_stopped_with_its_wrapper(tmp_path, real_env, sig, leftovers):
    """The real tritonserver (serving the digits export on the Python backend, so a backend stub runs)."""
    from click.testing import CliRunner

    from clustervig.cli import cvig
    from clustervig.train import WEIGHTS_DIR

    repo = tmp_path / "repo"
    res = CliRunner().invoke(cvig, ["export", "--checkpoint", str(WEIGHTS_DIR / "cvig_digits.pth"), "--no-validate",
                                    "--triton-repo", str(repo), "--triton-backend", "python", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "clustervig.runtime.triton_local", "serve", str(repo)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TMPDIR=str(tmp)))
    leftovers["pids"].append(proc.pid)
    line = proc.stdout.readline()
    assert line.startswith("tritonserver (PID "), line + proc.stderr.read()
    server = int(line.split("PID ")[1].split(")")[0])
    leftovers["groups"].append(server)
    port = int(line.split("HTTP 127.0.0.1:")[1].split(",")[0])
    group = _group(server)
    assert server in group and len(group) >= 2, group  # the server and its Python backend stub
    proc.send_signal(getattr(signal, sig))
    proc.communicate(timeout=120)
    assert gone(group, timeout=60) and port_free(port), _group(server)
    if sig == "SIGTERM":
        assert proc.returncode == 143 and list(tmp.glob("cvig-triton-*")) == []
