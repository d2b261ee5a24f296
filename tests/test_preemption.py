"""Preemption and double starts, with real processes: SIGTERM mid-run checkpoints and exits with
a resume hint, --resume then equals an uninterrupted run; a second writer of one output refuses,
a stale lock is taken over."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import adapter_tensors, max_diff, run_cli, write_recipe

RUN = {"max_steps": 12, "save_steps": 4, "logging_steps": 1, "save_total_limit": 5}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The recipe every test here interrupts, and its uninterrupted run's adapter."""
    tmp_path = tmp_path_factory.mktemp("straight")
    path = write_recipe(tmp_path, train=RUN)
    proc = run_cli("train", str(path), f"output={tmp_path / 'straight'}")
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    return path, adapter_tensors(tmp_path / "straight")


def wait_for(condition, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError("the training process did not get there in time")
        time.sleep(0.05)


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_sigterm_checkpoints_and_resume_equals_uninterrupted(straight, tmp_path):
    path, expected = straight
    stopped = tmp_path / "stopped"
    proc = run_cli("train", str(path), f"output={stopped}")
    wait_for(lambda: logged_steps(stopped) >= 2)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    last = proc.stderr.read().strip().splitlines()[-1]
    assert last.startswith("peftkit: error: SIGTERM at step") and f"peftkit train {stopped / 'recipe.yaml'} --resume" in last
    step = int(re.search(r"at step (\d+) of 12", last).group(1))
    assert 2 <= step < 12 and (stopped / "checkpoints" / f"checkpoint-{step}").is_dir()  # the signal's checkpoint
    assert not (stopped / "adapter").exists() and not list((stopped / "checkpoints").glob(".*tmp"))

    resumed = run_cli("train", str(stopped / "recipe.yaml"), "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert max_diff(expected, adapter_tensors(stopped)) <= 1e-5


def test_a_second_writer_refuses_and_a_stale_lock_is_taken_over(tmp_path):
    path = write_recipe(tmp_path, train={"max_steps": 2000, "save_steps": 5000, "logging_steps": 50})
    out = tmp_path / "run"
    first = run_cli("train", str(path))
    try:
        wait_for(lambda: logged_steps(out) >= 1)
        second = run_cli("train", str(path), "--resume")
        assert second.wait(timeout=120) != 0
        message = second.stderr.read().strip().splitlines()[-1]
        assert f"is being written by another peftkit process (pid {first.pid}" in message
    finally:
        first.kill()
        first.wait()
    lock = out.parent / f".{out.name}.lock"
    assert lock.is_file()  # SIGKILL leaves the lock behind; its pid is gone now
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{dead.stdout.strip()}\n{os.uname().nodename}\n")
    again = run_cli("train", str(path), "train.max_steps=2", "--overwrite")
    assert again.wait(timeout=300) == 0, again.stderr.read()
    assert "taking over the stale lock" in again.stderr.read()
    assert not lock.exists() and (out / "adapter" / "adapter_config.json").is_file()


def test_resume_skips_a_damaged_latest_checkpoint(straight, tmp_path):
    path, expected = straight
    damaged = tmp_path / "damaged"
    assert run_cli("train", str(path), f"output={damaged}").wait(timeout=600) == 0
    newest = damaged / "checkpoints" / "checkpoint-12"
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a save cut short
    for leftover in ("adapter", "system.json", "eval.json"):
        subprocess.run(["rm", "-rf", str(damaged / leftover)], check=True)
    resumed = run_cli("train", str(path), f"output={damaged}", "--resume")
    assert resumed.wait(timeout=600) == 0
    log = resumed.stderr.read()
    assert f"skipping {newest}: trainable.safetensors is unreadable" in log
    assert "resuming from" in log and "checkpoint-8" in log
    assert max_diff(expected, adapter_tensors(damaged)) <= 1e-5


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(straight, tmp_path):
    import resource

    path, expected = straight
    out = tmp_path / "run"
    proc = run_cli("train", str(path), f"output={out}")
    wait_for(lambda: (out / "checkpoints" / "checkpoint-4").is_dir())
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (4096, 4096))  # no checkpoint file past 4 KiB fits any more
    assert proc.wait(timeout=300) == 1
    last = proc.stderr.read().strip().splitlines()[-1]
    assert "could not write the checkpoint of step" in last and "is intact" in last and "--resume" in last
    assert not list((out / "checkpoints").glob(".*tmp")) and not (out / "adapter").exists()
    resumed = run_cli("train", str(path), f"output={out}", "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert max_diff(expected, adapter_tensors(out)) <= 1e-5
