"""What every ``cvig`` command shares: option spellings, output-path checks made before any work,
atomic file writes, and the signal handling that lets an interrupted command clean up.

Conventions (README, "The cvig command"): the variant is ``--model NAME``, weights are
``--checkpoint PATH``, exported files are positional arguments, ``--json`` prints JSON to
stdout, ``-o/--output PATH`` writes a file (or a folder for cvig export), and the TensorRT
plugin library is ``--plugins-lib PATH``.
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import click

from .utils import write_json_atomic

CTX = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


def existing_file(path: Path, what: str) -> Path:
    """``path`` must be a readable file: 'does not exist' and 'is a directory' are told apart."""
    path = Path(path)
    if path.is_dir():
        raise click.ClickException(f"{what} {path} is a directory, not a file (give the file inside it)")
    if not path.exists():
        raise click.ClickException(f"{what} {path} does not exist (check the path)")
    if not os.access(path, os.R_OK):
        raise click.ClickException(f"{what} {path} is not readable (check its permissions)")
    return path


def check_output_file(path: Optional[Path], option: str) -> Optional[Path]:
    """Fail now, before any long work, when ``path`` cannot be written as a file."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise click.BadParameter(f"{path} is a directory; give a file name, e.g. {path / 'results.json'}",
                                 param_hint=option)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise click.BadParameter(f"folder {parent} does not exist; create it first or choose another path",
                                 param_hint=option)
    why = _unwritable(parent) or (None if not path.exists() or os.access(path, os.W_OK) else "permission denied")
    if why:
        raise click.BadParameter(f"{path} cannot be written ({why}); choose another path", param_hint=option)
    return path


def _unwritable(folder: Path) -> Optional[str]:
    """Why no file can be created in ``folder`` (None when one can): a real probe file, so read-only
    file systems and permissions count for root too."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".cvig-probe-", dir=folder)
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    os.close(fd)
    os.unlink(probe)
    return None


def check_output_dir(path: Optional[Path], option: str) -> Optional[Path]:
    """Fail now when ``path`` cannot become a writable folder (it is not created here)."""
    if path is None:
        return None
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise click.BadParameter(f"{path} exists and is not a folder; choose a folder path", param_hint=option)
    probe = path.absolute()
    while not probe.exists():  # the nearest existing ancestor must let us create the rest
        probe = probe.parent
    if not probe.is_dir():
        raise click.BadParameter(f"{path} cannot be created: {probe} is not a folder", param_hint=option)
    why = _unwritable(probe)
    if why:
        raise click.BadParameter(f"{path} cannot be {'written' if probe == path.absolute() else 'created'} "
                                 f"({probe}: {why}); choose another folder", param_hint=option)
    return path


write_json = write_json_atomic  # the commands' JSON writer (-o/--output, report.json)


class ModelName(click.ParamType):
    """``--model NAME``: a registered variant, checked by :func:`clustervig.registry.resolve_model_name` (the one
    place names are resolved), so a typo is a usage error suggesting the nearest names, in every command."""

    name = "NAME"

    def get_metavar(self, param, ctx=None) -> str:  # click 8.2+ passes ctx
        return "NAME"

    def convert(self, value, param, ctx):
        from .registry import UnknownModelError, resolve_model_name

        if value is None:
            return None
        try:
            return resolve_model_name(str(value))
        except UnknownModelError as exc:
            self.fail(str(exc), param, ctx)

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        from .registry import list_models

        return [CompletionItem(n) for n in list_models() if n.startswith(incomplete)]


MODEL_NAME = ModelName()


def model_help(text: str) -> str:
    """``text`` and the registered variants, for a ``--model`` option's help."""
    from .registry import list_models

    return f"{text} One of: {', '.join(list_models())}."


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so ``finally`` blocks clean up (exit status 143)."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) instead of killing
    the process outright, so staging folders are removed on ``kill`` as on Ctrl-C."""
    def handler(signum, frame):
        raise Terminated()

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (a publish step is never cut in half)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Progress:
    """Progress of long work on stderr (stdout stays for results and --json).

    On a terminal one line is redrawn in place (at most 10 times a second) and ends with a newline when the work
    is done (``transient=True``: the line is erased instead); elsewhere (logs, CI, pipes) a line is written at
    each quarter of the work, once the work has run for ``quiet_s`` seconds and at least ``min_interval_s``
    after the previous line, so a quick job prints nothing. ``enabled=False`` (``--json``) prints nothing at
    all. Use as a context manager; ``update(n)`` adds ``n`` units done, ``note`` is shown after the count
    (e.g. the loss of a training step).
    """

    quiet_s = 1.0  # a job quicker than this stays silent off a terminal

    def __init__(self, label: str, total: int, unit: str = "images", enabled: bool = True, stream=None,
                 transient: bool = False, min_interval_s: float = 0.0) -> None:
        import sys
        import time

        self.label, self.total, self.unit = label, max(0, int(total)), unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and self.total > 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.note = ""
        self._clock = time.monotonic
        self._start = self._last = self._clock()
        self._quarter = 0
        self._shown = False
        self.transient = transient
        self.min_interval_s = min_interval_s

    def _line(self) -> str:
        pct = 100 * self.done // self.total if self.total else 100
        elapsed = self._clock() - self._start
        eta = ""
        if 0 < self.done < self.total:
            eta = f", about {elapsed * (self.total - self.done) / self.done:.0f} s left"
        note = f"  {self.note}" if self.note else ""
        return f"{self.label}: {self.done}/{self.total} {self.unit} ({pct}%) [{elapsed:.0f} s{eta}]{note}"

    def update(self, n: int = 1, note: Optional[str] = None) -> None:
        self.done = min(self.total, self.done + n)
        if note is not None:
            self.note = note
        if not self.enabled:
            return
        now = self._clock()
        if self.tty:
            if now - self._last >= 0.1 or self.done == self.total:
                self._last = now
                self.stream.write("\r\x1b[K" + self._line())
                self.stream.flush()
                self._shown = True
            return
        quarter = 4 * self.done // self.total
        if quarter > self._quarter:
            self._quarter = quarter
            final = self.done == self.total
            due = now - self._start >= self.quiet_s and now - self._last >= self.min_interval_s
            if (final and self._shown) or (not final and due):
                self._last = now
                self.stream.write(self._line() + "\n")
                self.stream.flush()
                self._shown = True

    def close(self) -> None:
        if self.enabled and self.tty and self._shown:
            self.stream.write("\r\x1b[K" if self.transient else "\n")
            self.stream.flush()
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
