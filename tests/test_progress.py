"""Progress output: bars on a terminal only, and the study's timed step lines."""

from __future__ import annotations

import io
import re
import sys

from gemma_eqx.core.runtime import progress
from interp.study import elapsed_printer


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_show_on_a_terminal_and_stay_quiet_in_a_pipe(monkeypatch):
    for stream, shown in ((_Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert list(progress(range(5), "dequantizing model.gguf", unit="leaf")) == list(range(5))
        text = stream.getvalue()
        assert ("dequantizing model.gguf: " in text and "/5 " in text) == shown, text
    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    list(progress(range(2), "forced", show=True))
    assert "forced" in quiet.getvalue()


def test_the_study_prints_timed_steps_when_asked(capsys):
    say = elapsed_printer()
    say("scoring heads")
    assert re.fullmatch(r"\[ +\d+\.\ds\] scoring heads\n", capsys.readouterr().err)
