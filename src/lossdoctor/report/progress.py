"""A transient progress line on stderr while a command runs: which phase, for how long."""

from __future__ import annotations

import threading
import time

from rich.console import Console
from rich.text import Text

from ..vocab import Phase

# a command that finishes sooner shows no progress at all
SHOW_AFTER_S = 1.0


class _Line:
    """The status text, timed when rich renders it (so the seconds tick on their own)."""

    def __init__(self, owner: PhaseStatus):
        self.owner = owner

    def __rich__(self) -> Text:
        o = self.owner
        elapsed = time.monotonic() - o.phase_start
        total = time.monotonic() - o.start
        return Text(f"lossdoctor: {o.phase} ({elapsed:.0f} s; {total:.0f} s in all)")


class PhaseStatus:
    """An ``on_phase`` callback drawing a rich status line on ``console`` once the command has
    run for ``show_after`` seconds; off a terminal (or not ``enabled``) it draws nothing. Use it
    as a context manager: the line is gone when the block ends."""

    def __init__(self, console: Console, show_after: float = SHOW_AFTER_S, enabled: bool = True):
        self.console, self.show_after = console, show_after
        self.enabled = enabled and console.is_terminal
        self.start = self.phase_start = time.monotonic()
        self.phase: Phase | None = None
        self._status = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._closed = False

    def __call__(self, phase: Phase) -> None:
        with self._lock:
            self.phase, self.phase_start = phase, time.monotonic()
            if self._timer is None and self.enabled:
                self._timer = threading.Timer(self.show_after, self._show)
                self._timer.daemon = True
                self._timer.start()

    def _show(self) -> None:
        with self._lock:
            if not self._closed:
                self._status = self.console.status(_Line(self), spinner="dots")
                self._status.start()

    def __enter__(self) -> PhaseStatus:
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            if self._status is not None:
                self._status.stop()
