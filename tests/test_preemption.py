"""Preemption and double starts, with real processes: SIGTERM mid-run checkpoints and exits with
a resume hint, --resume then equals an uninterrupted run; a second writer of one output refuses,
a stale lock is taken over."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_train import adapter_tensors, max_diff, run_cli, write_recipe

from peftkit.recipe import load_recipe
from peftkit.train import train
from peftkit.trainer import CheckpointFailed

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


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


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


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_data_parallel_sigterm_to_the_launcher_checkpoints_and_resumes(tmp_path, distributed):
    """SIGTERM to `peftkit train --nproc 2` alone (as a scheduler signals the process it started):
    the launcher passes it to both workers, which stop at the same step and checkpoint; resumed in
    two processes, the run equals one process at the same global batch (without dropout, whose
    masks each process draws from its own generator)."""
    path = write_recipe(tmp_path, adapter_overrides={"dropout": 0.0}, train={**RUN, "distributed": distributed})
    expected = adapter_tensors(train(load_recipe(str(path), [f"output={tmp_path / 'one'}"])))
    stopped = tmp_path / "stopped"
    proc = run_cli("train", str(path), f"output={stopped}", "train.batch_size=2", "--nproc", "2")
    wait_for(lambda: logged_steps(stopped) >= 2)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    lines = proc.stderr.read().strip().splitlines()
    assert lines[-1].startswith("peftkit: error: SIGTERM at step") and "--resume" in lines[-1]
    assert sum("SIGTERM at step" in line for line in lines) == 1  # the main worker's words only
    step = int(re.search(r"at step (\d+) of 12", lines[-1]).group(1))
    checkpoint = stopped / "checkpoints" / f"checkpoint-{step}"
    assert {p.name for p in checkpoint.glob("rng_*.json")} == {"rng_0.json", "rng_1.json"}  # both workers stopped there
    assert not (stopped / "adapter").exists()

    resumed = run_cli("train", str(stopped / "recipe.yaml"), "--nproc", "2", "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert max_diff(expected, adapter_tensors(stopped)) <= 1e-5


def test_a_second_ctrl_c_quits_at_once_and_keeps_the_last_checkpoint(straight, tmp_path):
    path, expected = straight
    out = tmp_path / "run"
    proc = run_cli("train", str(path), f"output={out}")
    wait_for(lambda: logged_steps(out) >= 6)  # checkpoint-4 is complete
    kept = files(out / "checkpoints" / "checkpoint-4")
    os.kill(proc.pid, signal.SIGINT)
    for line in proc.stderr:  # the first Ctrl-C is taken: the step and its checkpoint are under way
        if "received SIGINT" in line:
            break
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    last = proc.stderr.read().strip().splitlines()[-1]
    assert last == "peftkit: train interrupted by SIGINT"  # not "SIGINT at step N: checkpoint saved"
    assert files(out / "checkpoints" / "checkpoint-4") == kept
    assert not (out / "adapter").exists()

    resumed = run_cli("train", str(path), f"output={out}", "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert max_diff(expected, adapter_tensors(out)) <= 1e-5


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


def test_a_full_disk_while_saving_the_adapter_is_one_line_and_resume_writes_it(straight, tmp_path):
    """The end of a run, with a real file-size limit (RLIMIT_FSIZE; Python turns SIGXFSZ into EFBIG)."""
    import resource

    import peftkit
    from peftkit.checkpoint import save_adapter
    from peftkit.train import save_final

    path, expected = straight
    out = tmp_path / "run"
    shutil.copytree(path.parent / "straight", out)
    shutil.rmtree(out / "adapter")  # a run whose every step and checkpoint are done
    model = peftkit.load_adapter(peftkit.load_model("tiny-llama")[0], path.parent / "straight" / "adapter")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # the adapter's tensors need more
    try:
        with pytest.raises(CheckpointFailed) as failed:
            save_final(lambda m, d: save_adapter(m, d, overwrite=True), model, out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(failed.value)
    assert "\n" not in message and "could not write the adapter" in message and "File too large" in message
    assert f"{out / 'checkpoints' / 'checkpoint-12'} is intact" in message and "--resume" in message
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl", "recipe.yaml", "system.json"]

    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    (out / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "output": str(out)}))
    train(load_recipe(str(out / "recipe.yaml")), resume=True)  # from the last step's checkpoint: no step left
    assert max_diff(expected, adapter_tensors(out)) <= 1e-5
