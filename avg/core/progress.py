"""Progress bars that stay readable in log files.

On a terminal, :class:`tqdm` is tqdm's own bar. When its stream is not a terminal (CI, ``nohup``,
``> log 2>&1``) it prints one plain line at most every ``AVG_PROGRESS_SECONDS`` seconds (default
30) -- ``eval val: 64/157 [00:09<00:13, 6.91it/s]`` -- instead of a carriage-return
frame per refresh, so a log holds a few lines per loop rather than thousands of frames. Every
module of the package imports its bar from here.
"""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm as _tqdm

DEFAULT_SECONDS = 30.0


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def interval_seconds() -> float:
    """Seconds between lines when the output is not a terminal (``AVG_PROGRESS_SECONDS``)."""
    raw = os.environ.get("AVG_PROGRESS_SECONDS", "")
    try:
        return max(0.0, float(raw)) if raw.strip() else DEFAULT_SECONDS
    except ValueError:
        return DEFAULT_SECONDS


class LineStream:
    """A text stream that turns tqdm's ``\\r``-frames into whole lines (blank frames, the bar's
    erasure when it closes, are dropped)."""

    def __init__(self, stream) -> None:
        self.stream, self.last = stream, None

    def write(self, text: str) -> int:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.last = line
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


class tqdm(_tqdm):  # noqa: N801 (a drop-in for tqdm.tqdm)
    def __init__(self, *args, **kwargs) -> None:
        stream = kwargs.get("file") or sys.stderr
        self._lines = not kwargs.get("disable") and not _isatty(stream) and not isinstance(stream, LineStream)
        if self._lines:
            kwargs["file"] = LineStream(stream)
            kwargs.setdefault("mininterval", interval_seconds())
            kwargs.setdefault("bar_format", "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
            kwargs["dynamic_ncols"] = False
        super().__init__(*args, **kwargs)

    # a new postfix/description waits for the next timed line instead of printing one at once
    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs) -> None:
        super().set_postfix(ordered_dict, refresh=refresh and not self._lines, **kwargs)

    def set_postfix_str(self, s="", refresh=True) -> None:
        super().set_postfix_str(s, refresh=refresh and not self._lines)

    def set_description(self, desc=None, refresh=True) -> None:
        super().set_description(desc, refresh=refresh and not self._lines)


__all__ = ["tqdm", "LineStream", "interval_seconds"]
