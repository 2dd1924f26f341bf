"""Training progress: a bar on a terminal, a plain line per logged step in a log file."""

import io
import os

from fittune.progress import TrainingProgress

ROW = {"step": 4, "epoch": 0.5, "loss": 2.345678, "lr": 1e-4, "grad_norm": 0.75, "tokens_per_s": 12345.6}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_a_line_per_logged_step_and_no_bar(capsys):
    p = TrainingProgress(total=8, initial=3, enabled=True, terminal=io.StringIO())
    p.step_done()
    p.logged(ROW)
    p.logged({**ROW, "step": 8, "grad_norm": None, "val_loss": 1.5})
    p.close()
    assert capsys.readouterr().out.splitlines() == [
        "fittune: step 4/8  epoch 0.5  loss 2.3457  lr 1.00e-04  grad_norm 0.75  tokens/s 12,346",
        "fittune: step 8/8  epoch 0.5  loss 2.3457  lr 1.00e-04  tokens/s 12,346  val_loss 1.5000"]


def test_a_terminal_gets_the_bar_and_no_lines(capsys):
    terminal = Terminal()
    p = TrainingProgress(total=8, initial=3, enabled=True, terminal=terminal)
    p.step_done()
    p.logged(ROW)
    p.close()
    p.close()  # idempotent: an error after the end closes it again
    assert capsys.readouterr().out == ""
    assert "4/8" in terminal.getvalue() and "loss=2.3457" in terminal.getvalue()


def test_other_ranks_print_nothing(capsys):
    for terminal in (io.StringIO(), Terminal()):
        p = TrainingProgress(total=8, initial=0, enabled=False, terminal=terminal)
        p.step_done()
        p.logged(ROW)
        p.close()
        assert terminal.getvalue() == ""
    assert capsys.readouterr().out == ""


def test_library_bars_off_in_a_log_file_unless_the_user_chose(monkeypatch):
    from fittune.progress import library_bars_only_on_a_terminal

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr("sys.stderr", Terminal())
    library_bars_only_on_a_terminal()
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    monkeypatch.setattr("sys.stderr", io.StringIO())
    library_bars_only_on_a_terminal()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user's own choice wins
    library_bars_only_on_a_terminal()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
