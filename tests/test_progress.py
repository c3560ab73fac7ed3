"""Progress bars: tqdm frames on a terminal, a few whole lines in a log file (avg.core.progress)."""
from __future__ import annotations

import io
import time

from avg.core.progress import LineStream, interval_seconds, tqdm


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_a_terminal_prints_whole_timed_lines(monkeypatch):
    monkeypatch.setenv("AVG_PROGRESS_SECONDS", "0.05")
    out = io.StringIO()
    bar = tqdm(range(6), desc="work", file=out)
    for _ in bar:
        time.sleep(0.02)
        bar.set_postfix(loss=1.5)  # not a line of its own: it waits for the next timed line
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("work: 0/6") and lines[-1].startswith("work: 6/6")
    assert 2 <= len(lines) <= 6  # 6 steps of 20 ms at one line per 50 ms, plus first and last
    assert len(set(lines)) == len(lines)


def test_interval_bounds_the_lines_of_a_long_loop(monkeypatch):
    monkeypatch.setenv("AVG_PROGRESS_SECONDS", "30")
    out = io.StringIO()
    for _ in tqdm(range(5000), desc="fast", file=out):
        pass
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0], out.getvalue().splitlines()[-1]]
    assert "5000/5000" in out.getvalue().splitlines()[-1]


def test_a_terminal_keeps_the_live_bar():
    out = FakeTTY()
    for _ in tqdm(range(3), desc="tty", file=out, mininterval=0):
        pass
    assert "\r" in out.getvalue() and "|" in out.getvalue()


def test_closing_a_transient_bar_adds_no_blank_line_and_interval_parsing(monkeypatch):
    out = io.StringIO()
    for _ in tqdm(range(2), desc="t", file=out, leave=False):
        pass
    assert all(line.strip() for line in out.getvalue().splitlines())
    LineStream(out).write("\r      \r")
    assert out.getvalue().endswith("\n")
    monkeypatch.setenv("AVG_PROGRESS_SECONDS", "nope")
    assert interval_seconds() == 30.0
    monkeypatch.setenv("AVG_PROGRESS_SECONDS", "2.5")
    assert interval_seconds() == 2.5

