"""Small helpers shared by tests, demos and the export tools."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it replaces ``path`` (with the usual
    file mode, not mkstemp's 0600), on any error or interrupt it is removed: never a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Union[str, Path], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Union[str, Path], obj, indent: int = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")


class FolderBusy(RuntimeError):
    """The folder is held by another process's :func:`folder_lock`; ``pid`` is that process (None if unknown)."""

    def __init__(self, folder: Path, pid: Optional[int]):
        super().__init__(f"{folder} is in use by process {pid if pid is not None else '(unknown)'}")
        self.folder, self.pid = folder, pid


def _lock_holder(fd: int, tries: int = 10) -> Optional[int]:
    """The PID written in a lock file by its holder (it writes it just after taking the lock: wait a moment)."""
    for _ in range(tries):
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    return None


@contextlib.contextmanager
def folder_lock(folder: Union[str, Path], name: str) -> Iterator[Path]:
    """Hold ``folder`` for this process alone: an exclusive, non-blocking ``flock`` on the file ``name``
    inside it, which holds the holder's PID. Raises :class:`FolderBusy` (nothing created or touched) when
    another process holds it. The folder is created if missing (its parent must exist); on exit the lock
    file is removed, and so is the folder if this call created it and it is empty again.

    A lock file left behind by a killed process is not locked (the kernel drops a dead process's locks), so
    it is simply taken over. The file is removed while still locked; a process that opened it just before
    finds, once it holds the lock, that the path no longer names its file, and starts again."""
    folder = Path(folder)
    path = folder / name
    created = False
    while True:
        try:
            folder.mkdir()
            created = True
        except FileExistsError:
            pass
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the folder went away meanwhile (its last holder removed it): again
            continue
        except OSError:  # e.g. a full disk: leave no folder of ours behind
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            pid = _lock_holder(fd)
            os.close(fd)
            raise FolderBusy(folder, pid) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed the file after we opened it: lock the file that is there now
    try:
        try:  # best effort: on a full disk the lock holds without the PID
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if created:
            with contextlib.suppress(OSError):  # not empty: files were published, or another process came in
                folder.rmdir()
        os.close(fd)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics from ``batches``, in eval mode.

    A freshly initialised network has identity BN statistics, so activations
    grow block after block and logits reach 1e6. Train-mode statistics do not
    fix that for ClusterViG: k-means is chaotic under the tiny difference
    between batch and running statistics, partitions then differ between the
    calibration pass and inference, and the mismatch compounds to 1e9 logits.
    So each BN takes the exact mean/variance of the input it sees in an
    *eval-mode* pass, in forward order (a pre-hook fills the statistics just
    before the layer runs), which makes inference on these images exactly
    normalised. All batches are concatenated into one pass. Used to make
    random-weight models numerically realistic for tests, demos and exports
    without a checkpoint. Returns the model in eval mode.
    """
    x = torch.cat(list(batches), dim=0)

    def fill(bn: nn.modules.batchnorm._BatchNorm, args) -> None:
        inp = args[0]
        dims = [d for d in range(inp.ndim) if d != 1]
        bn.running_mean.copy_(inp.mean(dim=dims))
        bn.running_var.copy_(inp.var(dim=dims, unbiased=False))

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [bn.register_forward_pre_hook(fill) for bn in bns]
    model.eval()
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return model


def thread_cap() -> int:
    """The thread count that ``OMP_NUM_THREADS`` asks for (torch reads it itself at start-up), or 0 when it is
    unset or not a positive integer (then every library takes all cores)."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", "").strip() or 0)
    except ValueError:
        return 0
    return max(n, 0)


def ort_session_options(threads: int = 0):
    """``onnxruntime.SessionOptions`` for the CPU sessions of every cvig tool: warnings off; ``threads`` intra-op
    threads when given, else as many as ``OMP_NUM_THREADS`` asks for, and then threads that sleep instead of
    spinning between operators. ONNX Runtime ignores ``OMP_NUM_THREADS`` itself; without a cap it takes every
    core and spin-waits, which slows everything else when several exports or test workers share a machine."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    cap = thread_cap()
    if threads:
        opts.intra_op_num_threads = threads
    elif cap:
        opts.intra_op_num_threads = cap
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts
