"""Progress output: a redrawn bar on a terminal, one line per N updates in a log file."""
import io

import pytest

from sasq.progress import LineBar, bar


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_log_file_gets_one_line_per_n_updates(monkeypatch):
    monkeypatch.delenv("SASQ_PROGRESS", raising=False)
    monkeypatch.setenv("SASQ_PROGRESS_INTERVAL", "0")
    out = io.StringIO()  # not a TTY
    b = bar(total=100, desc="train scales", unit="step", stream=out)
    assert isinstance(b, LineBar)
    for _ in range(100):
        b.update(1)
    b.set_postfix({"loss": "1.23"}, refresh=False)
    b.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 11, lines  # every 10 steps + the closing line
    assert lines[0].startswith("train scales: 10/100 step (10%)")
    assert lines[-1].endswith("loss=1.23 (done)")


def test_short_bars_stay_silent_and_iteration_works(monkeypatch):
    monkeypatch.delenv("SASQ_PROGRESS", raising=False)
    monkeypatch.delenv("SASQ_PROGRESS_INTERVAL", raising=False)  # default 10 s floor
    out = io.StringIO()
    assert list(bar(range(5), desc="calibrate", stream=out)) == [0, 1, 2, 3, 4]
    assert out.getvalue() == ""


def test_resumed_bar_counts_from_initial(monkeypatch):
    monkeypatch.setenv("SASQ_PROGRESS_INTERVAL", "0")
    out = io.StringIO()
    b = LineBar(total=20, initial=10, desc="t", stream=out)
    for _ in range(10):
        b.update()
    b.close()
    first = out.getvalue().splitlines()[0]
    assert first.startswith("t: 11/20"), first  # a line per (20-10)/10 = 1 step, from step 10


def test_terminal_gets_tqdm_and_env_forces_style(monkeypatch):
    monkeypatch.delenv("SASQ_PROGRESS", raising=False)
    from tqdm import tqdm
    b = bar(total=3, stream=_Tty())
    assert isinstance(b, tqdm)
    b.close()
    monkeypatch.setenv("SASQ_PROGRESS", "lines")
    assert isinstance(bar(total=3, stream=_Tty()), LineBar)
    monkeypatch.setenv("SASQ_PROGRESS", "off")
    out = io.StringIO()
    list(bar(range(3), stream=out))
    assert out.getvalue() == ""


def test_bad_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SASQ_PROGRESS_EVERY", "ten")
    with pytest.raises(ValueError, match="SASQ_PROGRESS_EVERY"):
        bar(total=3, stream=io.StringIO())
