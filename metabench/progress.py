"""Training progress you can watch: a live bar per env on a terminal, a plain line every few
percent in a log.

The harness calls ``progress(env, updates_done, num_updates, env_steps_per_seed, seconds)``
after every chunk (a few seconds apart); :class:`Reporter` is such a callable. On a terminal
it draws one `rich <https://rich.readthedocs.io>`_ bar per env with updates done, env steps
per second (per seed) and the time left; when its stream is not a terminal (CI, a log file,
a scoring child whose parent captures it) it prints a line at every ``every`` of an env's
updates and when the env finishes, so a long task shows signs of life without flooding.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


def _eta(seconds: float, done: int, total: int) -> str:
    if done <= 0:
        return "?"
    left = seconds * (total - done) / done
    return f"{left:.0f}s" if left < 120 else f"{left / 60:.0f}min"


def line(env: str, done: int, total: int, steps: int, seconds: float) -> str:
    """The plain progress line: updates, env steps per seed, their rate and the time left."""
    rate = steps / seconds if seconds > 0 else 0.0
    pct = 100.0 * done / total if total else 100.0
    tail = f"{seconds:.1f}s" if done >= total else f"ETA {_eta(seconds, done, total)}"
    return (f"  {env}: {pct:3.0f}% {done}/{total} updates, {steps:,} env steps per seed, "
            f"{rate:,.0f} steps/s, {tail}")


class Reporter:
    """A progress callback for the harness; use it as a context manager so that a live
    display is closed when training ends (or fails)."""

    def __init__(self, stream: TextIO | None = None, every: float = 0.1,
                 live: bool | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.every = every
        self.live = self.stream.isatty() if live is None else live
        self._shown: dict[str, int] = {}
        self._bars: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    def __call__(self, env: str, done: int, total: int, steps: int, seconds: float) -> None:
        if self.live:
            self._draw(env, done, total, steps, seconds)
            return
        step = max(1, int(total * self.every))
        last = self._shown.get(env, 0)
        if done >= total or done // step > last // step or env not in self._shown:
            print(line(env, done, total, steps, seconds), file=self.stream, flush=True)
            self._shown[env] = done

    def _draw(self, env: str, done: int, total: int, steps: int, seconds: float) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        if self._bars is None:
            self._bars = Progress(
                TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("updates"), TextColumn("{task.fields[rate]} steps/s"),
                TextColumn("{task.fields[eta]}"), console=Console(file=self.stream),
                transient=False)
            self._bars.start()
        if env not in self._tasks:
            self._tasks[env] = self._bars.add_task(env, total=total, rate="-", eta="")
        rate = f"{steps / seconds:,.0f}" if seconds > 0 else "-"
        # Its own estimate from the env's elapsed time: rich's needs more samples than a
        # short run's chunks give it.
        eta = f"{seconds:.1f}s" if done >= total else f"ETA {_eta(seconds, done, total)}"
        self._bars.update(self._tasks[env], completed=done, rate=rate, eta=eta)
