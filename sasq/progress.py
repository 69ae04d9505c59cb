"""Progress bars that suit where stderr goes.

On a terminal: a tqdm bar. Elsewhere (a log file, CI, a notebook's captured stderr) a redrawn bar
becomes hundreds of carriage-return fragments on one line, so `bar()` returns a LineBar instead:
one plain line every N updates, and only when at least `interval` seconds passed since the last
line, so the many short bars of a run (a 4-window calibration) stay silent and a long one
(training) reports about ten times.

Environment: SASQ_PROGRESS=bar|lines|off forces a style; SASQ_PROGRESS_EVERY (updates between
lines, default a tenth of the total) and SASQ_PROGRESS_INTERVAL (seconds, default 10) tune lines.
"""
from __future__ import annotations

import os
import sys
import time

LINES_PER_BAR = 10
DEFAULT_INTERVAL_S = 10.0


def _style(stream) -> str:
    forced = os.environ.get("SASQ_PROGRESS", "").strip().lower()
    if forced in ("bar", "lines", "off"):
        return forced
    isatty = getattr(stream, "isatty", None)
    try:
        return "bar" if isatty is not None and isatty() else "lines"
    except ValueError:  # a closed stream
        return "off"


def _env_number(name: str, default, cast):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        v = cast(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {raw!r}")
    return v


class LineBar:
    """The subset of tqdm's interface sasq uses (update, set_postfix, close, iteration, with),
    printing `desc: n/total unit (p%) elapsed postfix` lines."""

    def __init__(self, iterable=None, total=None, desc=None, initial=0, unit="it", stream=None,
                 every=None, interval=None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc or "", unit
        self.n = self.initial = int(initial)
        self.stream = stream if stream is not None else sys.stderr
        default_every = max(1, -(-(total - initial) // LINES_PER_BAR)) if total else 100
        self.every = max(1, int(every if every is not None else
                                _env_number("SASQ_PROGRESS_EVERY", default_every, int)))
        self.interval = float(interval if interval is not None else
                              _env_number("SASQ_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S, float))
        self.postfix = ""
        self.t0 = self.last_t = time.monotonic()
        self.next_n = self.n + self.every
        self.printed = False
        self.closed = False

    def __iter__(self):
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __len__(self):
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        d = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in d.items())

    def set_description(self, desc=None, refresh=True):
        self.desc = desc or ""

    def refresh(self):
        pass

    def _line(self, final: bool) -> str:
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        el = time.monotonic() - self.t0
        rate = (self.n - self.initial) / el if el > 0 else 0.0
        s = f"{self.desc}: {done} {self.unit}{pct} {el:.0f}s, {rate:.3g} {self.unit}/s"
        if self.postfix:
            s += f", {self.postfix}"
        return s + (" (done)" if final and self.total and self.n >= self.total else "")

    def _print(self, final=False):
        print(self._line(final), file=self.stream, flush=True)
        self.printed = True
        self.last_t = time.monotonic()

    def update(self, n=1):
        self.n += n
        if self.n >= self.next_n:
            self.next_n = self.n - (self.n - self.initial) % self.every + self.every
            if time.monotonic() - self.last_t >= self.interval:
                self._print()

    def close(self):
        if self.closed:
            return
        self.closed = True
        # A short bar that never spoke stays silent; a long one ends with its totals.
        if self.printed or time.monotonic() - self.t0 >= self.interval:
            self._print(final=True)


def bar(iterable=None, *, total=None, desc=None, disable=False, initial=0, unit="it",
        leave=False, stream=None, **tqdm_kwargs):
    """A tqdm bar on a terminal, a LineBar otherwise, or a silent pass-through (disable=True or
    SASQ_PROGRESS=off). Takes tqdm's common arguments."""
    stream = stream if stream is not None else sys.stderr
    style = "off" if disable else _style(stream)
    if style == "lines":
        return LineBar(iterable, total=total, desc=desc, initial=initial, unit=unit, stream=stream)
    from tqdm import tqdm  # the terminal bar (tqdm.auto would pick a notebook widget and warn)
    tqdm_kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, disable=style == "off", initial=initial,
                unit=unit, leave=leave, file=stream, **tqdm_kwargs)
