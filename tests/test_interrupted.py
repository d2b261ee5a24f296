"""Interrupted eval, merge and export: a real SIGTERM or Ctrl-C while they compute (eval, in its own
process) or write (merge, export: the command in this process, signalled at a fixed point of its
writing) exits with 128 + the signal and one line, and leaves nothing under the output's name, not
even a hidden temp beside it. A signal that arrives while an output is being renamed into place
waits until it is complete."""

import os
import signal
from pathlib import Path

import pytest
from test_train import run_cli, write_recipe

from peftkit.atomic import replace_dir
from peftkit.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run directory that every command here reads."""
    tmp_path = tmp_path_factory.mktemp("interrupted")
    proc = run_cli("train", str(write_recipe(tmp_path, train={"max_steps": 2, "save_steps": 2})))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return tmp_path / "run"


def beside(out: Path) -> list[str]:
    """Everything in `out`'s folder (a test's own): the output, its record, hidden temps (`.<name>.tmp-...`)."""
    return sorted(os.listdir(out.parent))


def signal_after(monkeypatch, module, name: str, signum: int) -> None:
    """A real `signum` to this process right after `module.name` returns: a step that runs while the
    output is still in its hidden temp directory, so the signal lands there every time."""
    original = getattr(module, name)

    def then_signal(*args, **kwargs):
        result = original(*args, **kwargs)
        os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(module, name, then_signal)


@pytest.mark.parametrize("signum, extra", [(signal.SIGTERM, []),
                                           (signal.SIGINT, ["--combine", "linear", "--full", "--no-eval"])],
                         ids=["sigterm-one-source", "ctrl-c-combine-full"])
def test_interrupted_merge_leaves_nothing(run, tmp_path, monkeypatch, capsys, signum, extra):
    import peftkit.merge

    out = tmp_path / "merged"
    sources = [str(run)] * (2 if extra else 1)  # a run combined with itself: two named sources
    signal_after(monkeypatch, peftkit.merge, "_card", signum)  # the card: the last file written into the temp
    assert main(["merge", *sources, *extra, "--out", str(out)]) == 128 + signum
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"peftkit: merge interrupted by {signal.Signals(signum).name}: nothing was written to {out}"
    assert beside(out) == []


def test_interrupted_export_leaves_nothing(run, tmp_path, monkeypatch, capsys):
    import peftkit.export

    out = tmp_path / "tiny.gguf"
    signal_after(monkeypatch, peftkit.export, "write_gguf", signal.SIGINT)  # the file written, not yet in place
    assert main(["export", str(run), "--out", str(out)]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"peftkit: export interrupted by SIGINT: nothing was written to {out}"
    assert beside(out) == [] and not out.with_name("tiny.gguf.json").exists()


def test_eval_interrupted_while_computing_leaves_nothing(run, tmp_path):
    out = tmp_path / "eval.json"
    proc = run_cli("eval", str(run), "--tasks", "sst2", "--limit", "16", "--no-cache", "--out", str(out))
    for line in proc.stderr:  # logged as the task starts; 16 examples take seconds
        if "sst2: evaluating" in line:
            break
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    last = proc.stderr.read().strip().splitlines()[-1]
    assert last == f"peftkit: eval interrupted by SIGTERM: nothing was written to {out}"
    assert beside(out) == [] and not (run / "eval.json").exists()


def test_a_signal_between_the_renames_of_a_replace_waits_for_both(tmp_path, monkeypatch):
    new, target = tmp_path / ".new", tmp_path / "out"
    for directory, text in ((new, "new"), (target, "old")):
        directory.mkdir()
        (directory / "weights").write_text(text)
    rename = os.rename

    def rename_then_ctrl_c(src, dst):
        rename(src, dst)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "rename", rename_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new, target)
    assert (target / "weights").read_text() == "new" and beside(target) == ["out"] and not new.exists()


def test_export_signalled_while_renaming_into_place_says_it_finished(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tiny.gguf"
    replace = os.replace

    def replace_then_sigterm(src, dst):
        replace(src, dst)
        if Path(dst) == out:  # between the file and its record
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "replace", replace_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["export", str(run), "--out", str(out)]) == 143
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"peftkit: export interrupted by SIGTERM just after it wrote {out}, which is complete"
    assert beside(out) == ["tiny.gguf", "tiny.gguf.json"]
    assert signal.getsignal(signal.SIGTERM) is handler  # main gave SIGTERM back
