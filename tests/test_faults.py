"""Fault injection: a run killed at any moment, or stopped by a full disk, loses nothing.

- ``salientft train`` killed with SIGKILL three times at seeded random moments (once while a
  checkpoint is being written: ``SALIENTFT_TEST_ATOMIC_DELAY`` holds each atomic write open),
  resumed each time with ``--resume``, ends with the adapter of an uninterrupted run, bit for bit;
- a checkpoint write failing with ENOSPC stops the run (exit code 3) naming the last good
  checkpoint, which stays intact and resumable;
- what killed writes leave (temporaries, checkpoints without their marker) is cleaned at the next start.
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import suite_device
from salientft._io import TEST_DELAY_ENV, check_writable, remove_temporaries
from salientft.cli import main
from salientft.train import COMPLETE_MARKER, complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


def data_file(folder: Path) -> str:
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(24)]
    path = folder / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train_argv(data: str, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["train", "--model", "tiny-random-llama", "--data", data, "--output", str(out), "--method", "gift-sw",
            "--metric", "magnitude", "--n-salient", "4", "--max-steps", str(steps), "--save-steps", "1",
            "--batch-size", "2", "--max-length", "64", "--dtype", "fp32", "--lr", "1e-3", "--warmup-ratio", "0",
            "--no-eval-before", "--device", str(suite_device()), *extra]


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def leftovers(out: Path) -> list[str]:
    """Temporaries of atomic writes and checkpoints without their completion marker."""
    found = [str(p.relative_to(out)) for p in out.rglob(".*.tmp")]
    found += [p.name for p in out.glob("checkpoint-*") if not (p / COMPLETE_MARKER).exists()]
    return sorted(found)


class Run:
    """``salientft train`` in a subprocess (one thread, as the uninterrupted run it is compared with)."""

    def __init__(self, argv: list[str], delay: float | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        env.pop(TEST_DELAY_ENV, None)
        if delay is not None:
            env[TEST_DELAY_ENV] = str(delay)
        self.proc = subprocess.Popen([sys.executable, "-m", "salientft.cli", *argv], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_until(self, condition, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (code {self.proc.returncode}) before it could be killed:\n"
                            f"{self.proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail("timed out waiting for the run")
            time.sleep(0.02)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stderr.close()

    def finish(self, timeout: float = 120.0) -> None:
        _, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err[-3000:]


def mid_write(out: Path) -> list[Path]:
    """Half-written adapter files. The run being watched may delete a checkpoint folder (an
    interrupted one, on resume) between glob's listing and its scan of that folder: look again."""
    for _ in range(50):
        try:
            return list(out.glob("checkpoint-*/.adapter.*.tmp"))
        except FileNotFoundError:
            time.sleep(0.01)
    return list(out.glob("checkpoint-*/.adapter.*.tmp"))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    rng = random.Random(20240611)
    data = data_file(tmp_path)
    straight_out, killed_out = tmp_path / "straight", tmp_path / "killed"
    straight = Run(train_argv(data, straight_out))  # runs alongside the interrupted one

    def steps_done() -> int:
        done = complete_checkpoints(killed_out)
        return int(done[-1].name.split("-")[1]) if done else 0

    # 1. killed at a random moment after a random number of checkpoints (each write held open for
    # 0.3 s so that the run cannot finish between two polls)
    run = Run(train_argv(data, killed_out), delay=0.3)
    target = rng.randint(1, 3)
    run.wait_until(lambda: steps_done() >= target)
    time.sleep(rng.uniform(0.0, 0.3))
    run.kill()
    assert 1 <= steps_done() < STEPS

    # 2. killed while a checkpoint is being written (each atomic write held open for a while)
    stale = set(mid_write(killed_out))  # kill 1 may have struck mid-write too; the next start cleans it
    run = Run(train_argv(data, killed_out, "--resume"), delay=2.0)
    run.wait_until(lambda: bool(set(mid_write(killed_out)) - stale))
    time.sleep(rng.uniform(0.0, 0.5))
    run.kill()
    half_written = set(mid_write(killed_out)) - stale
    assert half_written and not (next(iter(half_written)).parent / COMPLETE_MARKER).exists()
    assert steps_done() < STEPS

    # 3. killed at a random moment after at least one more checkpoint
    before = steps_done()
    run = Run(train_argv(data, killed_out, "--resume"), delay=0.3)
    target = min(before + rng.randint(1, 2), STEPS - 1)
    run.wait_until(lambda: steps_done() >= target)
    time.sleep(rng.uniform(0.0, 0.3))
    run.kill()
    assert steps_done() < STEPS

    # 4. the last resume finishes; the interrupted run ends exactly where the uninterrupted one does
    Run(train_argv(data, killed_out, "--resume")).finish()
    straight.finish()
    a, b = adapter_tensors(straight_out), adapter_tensors(killed_out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after three kills and resumes"
    ma = json.loads((straight_out / "metrics.json").read_text())
    mb = json.loads((killed_out / "metrics.json").read_text())
    assert mb["steps"] == ma["steps"] == STEPS and mb["resumed_from"] is not None
    assert mb["tokens_seen"] == ma["tokens_seen"] > 0  # counted across the resumes
    assert [h["loss"] for h in mb["train_loss"]][-1] == [h["loss"] for h in ma["train_loss"]][-1]
    assert leftovers(killed_out) == []


@pytest.mark.slow
def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from salientft.methods.gift_sw import GiftSW

    data = data_file(tmp_path)
    out = tmp_path / "run"
    real_save = GiftSW.save_checkpoint
    calls = []

    def save_until_the_disk_is_full(self, model, directory):
        calls.append(directory)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, model, directory)

    monkeypatch.setattr(GiftSW, "save_checkpoint", save_until_the_disk_is_full)
    argv = train_argv(data, out, steps=4)
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "stopped: could not write checkpoint-3 (No space left on device)" in err
    assert f"the last good checkpoint is {out / 'checkpoint-2'} and intact" in err and "--resume" in err
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "checkpoint-3").exists() and leftovers(out) == []  # the failed one is removed
    assert not (out / "metrics.json").exists()

    monkeypatch.setattr(GiftSW, "save_checkpoint", real_save)  # space again: the run continues from step 2
    assert main([*argv, "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["resumed_from"] == str(out / "checkpoint-2")


@pytest.mark.slow
def test_leftovers_of_killed_writes_are_cleaned_at_the_next_start(tmp_path):
    data = data_file(tmp_path)
    out = tmp_path / "run"
    assert main(train_argv(data, out, steps=2)) == 0
    # what kills at unlucky moments leave: a half-written adapter inside a checkpoint, a temporary
    # file, a checkpoint without its marker, and the previous adapter moved aside mid-swap
    (out / "checkpoint-2" / ".adapter.k1ll3d00.tmp").mkdir()
    (out / ".metrics.json.abcd_123.tmp").write_text("{")
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "optimizer.pt").write_bytes(b"\0")
    (out / "adapter").rename(out / ".adapter.old")
    assert len(leftovers(out)) == 3
    assert main(train_argv(data, out, "--resume", steps=3)) == 0  # a longer run may resume
    assert leftovers(out) == [] and not (out / ".adapter.old").exists()
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


def test_remove_temporaries_puts_back_a_folder_moved_aside(tmp_path):
    (tmp_path / ".adapter.old").mkdir()
    (tmp_path / ".adapter.old" / "w").write_text("previous")
    (tmp_path / ".adapter.abcdefgh.tmp").mkdir()
    (tmp_path / ".loss.png.12345678.tmp").write_text("")
    (tmp_path / ".keep.tmp").write_text("not ours: no random part")
    removed = remove_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".adapter.abcdefgh.tmp", ".loss.png.12345678.tmp"]
    assert (tmp_path / "adapter" / "w").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep.tmp", "adapter"]


def test_check_writable_leaves_nothing_behind(tmp_path):
    check_writable(tmp_path / "a" / "b" / "out", kind="dir")
    check_writable(tmp_path / "c" / "r.json", kind="file")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="--output .*f is a file"):
        check_writable(tmp_path / "f", kind="dir")
    with pytest.raises(IsADirectoryError, match="--plot .* is a directory"):
        check_writable(tmp_path, kind="file", flag="--plot")
    with pytest.raises(PermissionError, match="cannot be written"):
        check_writable("/proc/salientft-test/x.json", kind="file")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="cannot be written"):
            check_writable(ro / "run", kind="dir")
