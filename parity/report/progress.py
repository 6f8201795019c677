"""Progress display for the CLI: a rich progress bar that appears only once a capture or
diff has taken more than a second, and never when output is not a terminal or with
--quiet.  The library only calls `progress(what, done, total)`; this is one such callback."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


class DelayedProgress:
    """Callable progress sink; use as a context manager so the display is always closed."""

    def __init__(self, console: Console, enabled: bool, delay_s: float = 1.0, clock=time.monotonic):
        self.console, self.enabled, self.delay_s, self.clock = console, enabled, delay_s, clock
        self.started = clock()
        self.display: Progress | None = None
        self.tasks: dict[str, int] = {}
        self.was_shown = False

    def __enter__(self) -> DelayedProgress:
        self.started = self.clock()
        return self

    def __exit__(self, *exc) -> None:
        if self.display is not None:
            self.display.stop()
            self.display = None

    def __call__(self, what: str, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if self.display is None:
            if self.clock() - self.started < self.delay_s:
                return
            # imported only now: most runs end before a bar is due (CLI start-up time)
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self.display = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                    MofNCompleteColumn(), TimeElapsedColumn(), console=self.console, transient=True)
            self.display.start()
            self.was_shown = True
        if what not in self.tasks:
            self.tasks[what] = self.display.add_task(what, total=total)
        self.display.update(self.tasks[what], completed=done, total=total)
