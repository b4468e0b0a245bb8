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
import math
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
from salientft.outputs import record
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
    record(out, "checkpoint-3")  # salientft records a checkpoint's name before writing it
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


# ----------------------------------------------------------------------------- a really full disk


@pytest.fixture
def small_fs(tmp_path):
    """A real 4 MiB filesystem (tmpfs) at ``tmp_path / "fs"``; skipped, with the reason, where this
    process may not mount one (not root, or no CAP_SYS_ADMIN in a container)."""
    import shutil as _shutil

    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or _shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8): the faked ENOSPC test covers the logic")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path, leave: int) -> Path:
    """Fill the filesystem of ``folder`` until ``leave`` bytes are free; returns the filler file."""
    filler = folder / "filler"
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free - leave, 0))
    return filler


@pytest.mark.slow
@pytest.mark.parametrize("writer, leave, reason", [
    ("safetensors", 8 << 10, "No space left on device"),          # the adapter's SafetensorError
    ("torch.save", 40 << 10, "the writer failed: is the disk full?"),  # the optimizer's RuntimeError
])
def test_a_really_full_disk_stops_the_run_at_the_last_good_checkpoint(tmp_path, small_fs, writer, leave, reason):
    """The disk fills while checkpoint-2 is written: whatever library raises (safetensors'
    SafetensorError, torch.save's RuntimeError), the run stops with OutputWriteError (exit 3 on the
    command line) naming checkpoint-1, and no half-written checkpoint stays visible."""
    from transformers import TrainerCallback

    from salientft.config import TrainConfig
    from salientft.train import OutputWriteError, train

    data = data_file(tmp_path)
    out = small_fs / "run"
    cfg = TrainConfig(model="tiny-random-llama", data=data, output=str(out), method="gift-sw", metric="magnitude",
                      n_salient=4, max_steps=3, save_steps=1, batch_size=2, max_length=64, dtype="fp32", lr=1e-3,
                      warmup_ratio=0.0, eval_before=False)

    class FillTheDisk(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:  # before checkpoint-2 is written
                _fill(small_fs, leave)

    with pytest.raises(OutputWriteError) as stop:
        train(cfg, callbacks=[FillTheDisk()])
    assert f"could not write checkpoint-2 ({reason})" in str(stop.value)
    assert f"the last good checkpoint is {out / 'checkpoint-1'} and intact" in str(stop.value)
    cause = stop.value.__cause__
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert not isinstance(cause, OSError) or writer == "safetensors"  # a library's own error, not an OSError
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]
    assert not (out / "checkpoint-2").exists() and leftovers(out) == []
    (small_fs / "filler").unlink()  # space again: the run continues from checkpoint-1
    result = train(cfg, resume=True)
    assert result["steps"] == 3 and result["resumed_from"] == str(out / "checkpoint-1")


def test_write_failures_are_recognised_whatever_raises_them():
    from salientft.outputs import write_failure

    assert write_failure(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
    assert write_failure(OSError(errno.EIO, "Input/output error")) == "Input/output error"
    assert write_failure(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert write_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"))
    assert write_failure(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert write_failure(wrapped) == "No space left on device"
    assert write_failure(ValueError("a bug")) is None and write_failure(OSError(errno.ENOENT, "missing")) is None


# ----------------------------------------------------------------------------- interrupts


def _cli(argv: list[str], **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", **env}
    full.pop(TEST_DELAY_ENV, None)
    return subprocess.run([sys.executable, "-m", "salientft.cli", *argv], env=full, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupt_saves_a_checkpoint_and_says_how_to_resume(tmp_path, name, code):
    """SIGINT / SIGTERM at the end of step 2 (sent by the process itself through the test hook, so
    the moment is exact), with the default --save-steps 0: checkpoint-2 is saved, the command says
    how to continue and exits 130 / 143 without a traceback; --resume then finishes the run."""
    from salientft.train import TEST_SIGNAL_ENV

    data = data_file(tmp_path)
    out = tmp_path / "run"
    argv = [a for a in train_argv(data, out, steps=4) if a not in ("--save-steps", "1")]
    stopped = _cli(argv, **{TEST_SIGNAL_ENV: f"2:{name}"})
    assert stopped.returncode == code, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert f"salientft train: interrupted by {name} after step 2: checkpoint-2 is saved; continue the run with " \
           "--resume" in stopped.stderr
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "metrics.json").exists() and leftovers(out) == []
    if name == "SIGTERM":
        return
    resumed = _cli([*argv, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["resumed_from"] == str(out / "checkpoint-2")


# ----------------------------------------------------------------------------- one writer per run folder


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_killed_holder_s_lock_is_taken_over(tmp_path, capsys):
    data = data_file(tmp_path)
    out = tmp_path / "run"
    first = Run(train_argv(data, out, steps=3), delay=1.0)  # each checkpoint held open: the run lasts a while
    lock = out / ".salientft.lock"
    first.wait_until(lambda: lock.is_file() and lock.read_text().strip() == str(first.proc.pid))
    # a second process, started while the first trains: refused before any work, naming the holder
    assert main(train_argv(data, out, "--resume", steps=3)) == 2
    assert f"--output {out} is in use by another salientft process (PID {first.proc.pid})" in capsys.readouterr().err
    first.wait_until(lambda: len(complete_checkpoints(out)) >= 1)
    first.kill()  # killed: the OS releases its lock; the file still names it
    assert lock.read_text().strip() == str(first.proc.pid)
    assert main(train_argv(data, out, "--resume", steps=3)) == 0  # the stale lock is taken over
    assert lock.read_text() == ""  # released at the end
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


# ----------------------------------------------------------------------------- resume


def _config(tmp_path, out: Path, **kw):
    from salientft.config import TrainConfig

    settings = dict(model="tiny-random-llama", data=data_file(tmp_path), output=str(out), method="gift-sw",
                    metric="magnitude", n_salient=4, max_steps=3, save_steps=1, batch_size=2, max_length=64,
                    dtype="fp32", lr=1e-3, warmup_ratio=0.0, eval_before=False)
    return TrainConfig(**{**settings, **kw})


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_a_finished_run_is_not_trained_again_and_the_final_save_is_recovered(tmp_path):
    from salientft.train import train

    out = tmp_path / "run"
    cfg = _config(tmp_path, out)
    train(cfg)
    before = _snapshot(out)
    again = train(cfg, resume=True)  # finished: nothing is trained, nothing written
    assert again["already_complete"] and again["steps"] == 3
    assert _snapshot(out) == before

    # killed during the final save: checkpoint-3 complete, the outputs missing. --resume writes them
    # without training another step: the adapter is checkpoint-3's, bit for bit.
    for name in ("adapter", "metrics.json", "loss.png"):
        p = out / name
        p.unlink() if p.is_file() else __import__("shutil").rmtree(p)
    finished = train(cfg, resume=True)
    assert finished["steps"] == 3 and finished["resumed_from"] == str(out / "checkpoint-3")
    from safetensors.torch import load_file

    final = adapter_tensors(out)
    saved = load_file(str(out / "checkpoint-3" / "adapter" / "adapter_model.safetensors"))
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)

    longer = train(_config(tmp_path, out, max_steps=4), resume=True)  # a larger --max-steps continues it
    assert longer["steps"] == 4 and not longer.get("already_complete")
    history = json.loads((out / "run_history.json").read_text())["history"]
    assert [h["event"] for h in history] == ["started", "resumed", "resumed"]
    assert history[-1]["changes"] == ["max_steps: 3 -> 4"] and history[-1]["from_checkpoint"] == "checkpoint-3"


@pytest.mark.slow
def test_resume_may_lower_the_learning_rate_and_it_is_followed(tmp_path):
    """A resume at half the learning rate continues the schedule at half the rate (the optimizer and
    scheduler states hold the old one) and records the change in the run's history."""
    from salientft.train import train

    straight, lowered = tmp_path / "straight", tmp_path / "lowered"
    train(_config(tmp_path, straight, max_steps=4))
    train(_config(tmp_path, lowered, max_steps=4))
    for name in ("checkpoint-3", "checkpoint-4", "adapter", "metrics.json", "loss.png"):
        p = lowered / name
        p.unlink() if p.is_file() else __import__("shutil").rmtree(p)
    train(_config(tmp_path, lowered, max_steps=4, lr=5e-4), resume=True)

    def rates(out):
        state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
        return {h["step"]: h["learning_rate"] for h in state["log_history"] if "learning_rate" in h}

    a, b = rates(straight), rates(lowered)
    assert b[1] == a[1] and b[2] == a[2]  # before the resume: the run's own rates
    assert b[3] == pytest.approx(a[3] / 2, rel=1e-12) and b[4] == pytest.approx(a[4] / 2, rel=1e-12)
    history = json.loads((lowered / "run_history.json").read_text())["history"]
    assert history[-1]["changes"] == ["lr: 0.001 -> 0.0005"] and history[-1]["from_checkpoint"] == "checkpoint-2"
    from salientft.config import TrainConfig

    with pytest.raises(ValueError, match=r"lr: 0.0005 -> 0.001"):  # raising it again is refused
        train(_config(tmp_path, lowered, max_steps=5), resume=True)
    assert TrainConfig  # (imported for the config type only)


@pytest.mark.slow
def test_a_huge_learning_rate_stops_at_weights_that_were_finite(tmp_path):
    """--lr 1e30: the weights after step 1 are ~1e30 and the loss of step 2 is not finite. Those
    weights are not a good checkpoint (their loss is not finite): none is kept, the advice names
    what --resume accepts, and a resume with a lower --lr then trains normally."""
    from salientft.train import NonFiniteLossError, train

    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as stop:
        train(_config(tmp_path, out, lr=1e30))
    message = str(stop.value)
    assert "no checkpoint was written yet" in message or "whose weights gave it, was deleted" in message, message
    assert "with a lower learning rate (--resume --lr <lower>)" in message
    assert "--dtype fp32" not in message  # the run is in fp32 already: the advice offers only what can help
    for ckpt in complete_checkpoints(out):  # whatever is left is finite
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() and t.abs().max() < 1e10 for t in
                   load_file(str(ckpt / "adapter" / "adapter_model.safetensors")).values()), ckpt
    result = train(_config(tmp_path, out, lr=1e-3), resume=True)  # the advice, followed
    assert result["steps"] == 3 and all(math.isfinite(h["loss"]) for h in result["train_loss"])
    assert json.loads((out / "run_history.json").read_text())["history"][-1]["changes"] == ["lr: 1e+30 -> 0.001"]


def test_the_data_file_is_compared_by_its_content(tmp_path, monkeypatch):
    from salientft.runfolder import _record, config_changes, Plan

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "good.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    cfg = _config(tmp_path, tmp_path / "run", data="data/good.jsonl")
    stored = _record(cfg, None, Plan())
    assert config_changes(stored, _config(tmp_path, tmp_path / "run", data="./data/../data/good.jsonl")) == []
    (tmp_path / "copy.jsonl").write_bytes((tmp_path / "data" / "good.jsonl").read_bytes())
    assert config_changes(stored, _config(tmp_path, tmp_path / "run", data=str(tmp_path / "copy.jsonl"))) == []
    (tmp_path / "data" / "good.jsonl").write_text('{"prompt": "a", "response": "c"}\n')  # rewritten in place
    changes = config_changes(stored, _config(tmp_path, tmp_path / "run", data="./data/../data/good.jsonl"))
    assert len(changes) == 1 and changes[0].startswith("data: ./data/../data/good.jsonl changed since the run started")
    legacy = {k: v for k, v in stored.items() if k not in ("data_sha256", "history")}  # no hash: resolved paths
    assert config_changes(legacy, _config(tmp_path, tmp_path / "run", data="./data/../data/good.jsonl")) == []


# ----------------------------------------------------------------------------- what salientft wrote


def test_the_manifest_decides_what_is_salientft_s(tmp_path):
    from salientft.outputs import MANIFEST, clear, foreign, listed, record, remove_stale

    (tmp_path / "thesis.tex").write_text("mine")
    (tmp_path / "results.json").write_text("{}")  # looks like salientft's, but is not listed
    record(tmp_path, "model", "loss.png")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w").write_text("x")
    (tmp_path / "loss.png").write_text("png")
    (tmp_path / ".model.abcdefgh.tmp").mkdir()  # a killed write of a listed name
    (tmp_path / ".results.json.12345678.tmp").write_text("")  # a look-alike of an unlisted name: the user's
    assert listed(tmp_path) == {"model", "loss.png"}
    assert foreign(tmp_path) == [".results.json.12345678.tmp", "results.json", "thesis.tex"]
    assert [p.name for p in remove_stale(tmp_path)] == [".model.abcdefgh.tmp"]
    clear(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".results.json.12345678.tmp", MANIFEST, "results.json",
                                                          "thesis.tex"]
    assert listed(tmp_path) == set()


def test_one_sweeper_serves_checkpoints_and_shared_folders(tmp_path):
    """``remove_temporaries`` (a checkpoint: every temporary goes) and ``outputs.remove_stale`` (a
    folder shared with a user: only temporaries of names salientft listed, ``only`` one of them)
    are one sweep with another ownership test."""
    from salientft.outputs import MANIFEST, record, remove_stale

    record(tmp_path, "a", "b")
    for name in (".a.abcdefgh.tmp", ".b.abcdefgh.tmp", ".c.abcdefgh.tmp", "plain.txt"):
        (tmp_path / name).write_text("")
    assert [p.name for p in remove_stale(tmp_path, only="b")] == [".b.abcdefgh.tmp"]
    assert [p.name for p in remove_stale(tmp_path)] == [".a.abcdefgh.tmp"]
    assert [p.name for p in remove_temporaries(tmp_path)] == [".c.abcdefgh.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "plain.txt"]


def test_a_killed_folder_write_is_recognised_and_cleaned(tmp_path):
    """quantize/export write their folder through a hidden temporary sibling that holds a manifest
    from its first moment: a killed write leaves it behind, and the next write of that folder
    removes it; a hidden folder of the user's with a look-alike name is left alone."""
    from salientft.outputs import MANIFEST, claim_dir, output_dir

    killed = tmp_path / ".q4.k1ll3d00.tmp"
    killed.mkdir()
    (killed / MANIFEST).write_text('{"salientft_manifest": 1, "entries": []}')
    (killed / "model.safetensors").write_bytes(b"\0" * 1000)
    users = tmp_path / ".q4.mine0000.tmp"
    users.mkdir()
    claim_dir(tmp_path / "q4")  # the next start of a write of q4 removes the killed one's folder
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q4.mine0000.tmp"]
    with output_dir(tmp_path / "q4") as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q4.mine0000.tmp", "q4"]
    assert sorted(p.name for p in (tmp_path / "q4").iterdir()) == [MANIFEST, "config.json"]
    with pytest.raises(FileExistsError, match="holds an earlier output of salientft; replace it with --overwrite"):
        claim_dir(tmp_path / "q4")
    claim_dir(tmp_path / "q4", overwrite=True)
    (tmp_path / "q4" / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match=r"also holds files salientft did not write \(thesis.tex\)"):
        claim_dir(tmp_path / "q4", overwrite=True)


def test_the_lock_names_its_holder_and_is_taken_over_after_a_kill(tmp_path):
    from salientft.outputs import FolderLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom salientft.outputs import FolderLock\n"
                               f"FolderLock({str(tmp_path)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(60)"],
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert FolderLock.holder(tmp_path) == holder.pid
        with pytest.raises(FileExistsError, match=f"in use by another salientft process \\(PID {holder.pid}\\)"):
            FolderLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert FolderLock.holder(tmp_path) is None  # the OS released it with the process
    lock = FolderLock(tmp_path).acquire()
    assert lock.stale_pid == holder.pid
    lock.release()


def test_any_command_stops_on_a_full_disk_or_an_interrupt_with_one_line(tmp_path, monkeypatch, capsys):
    """Beyond train: a write failure from any library is exit 3, SIGINT / SIGTERM outside a training
    loop is 130 / 143, each with one line and no traceback."""
    import salientft.cli as cli
    import salientft.pipelines

    def full_disk(*a, **kw):
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(salientft.pipelines, "save_scores", full_disk)
    scores = tmp_path / "s.safetensors"
    assert main(["calibrate", "--model", "tiny-random-llama", "--metric", "magnitude", "--output", str(scores)]) == 3
    err = capsys.readouterr().err
    assert "salientft calibrate: stopped: could not write an output (No space left on device)" in err
    assert "Traceback" not in err and not scores.exists()

    for exc, code, name in ((KeyboardInterrupt, 130, "SIGINT"), (cli._Terminated, 143, "SIGTERM")):
        def interrupted(args, exc=exc):
            raise exc

        monkeypatch.setattr(cli, "_run_compare", interrupted)
        assert main(["compare", str(tmp_path)]) == code
        err = capsys.readouterr().err
        assert err.startswith(f"salientft compare: interrupted by {name}; ") and len(err.strip().splitlines()) == 1


def test_a_run_of_an_older_salientft_is_resumed_never_deleted(tmp_path):
    """A run folder written before manifests (run_config.json, no manifest listing it) is
    recognised by salientft's names: --resume adopts them into a manifest; --overwrite deletes
    nothing and lists them; an `eval --output` written into it since does not hide it."""
    from salientft.outputs import listed, record
    from salientft.runfolder import plan_output, start_run

    out = tmp_path / "old"
    cfg = _config(tmp_path, out)
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / COMPLETE_MARKER).write_text("1\n")
    (out / "run_config.json").write_text(json.dumps(cfg.to_dict()))
    (out / "results.json").write_text("{}")
    record(out, "results.json")  # salientft eval --output old/results.json, by a newer salientft
    with pytest.raises(FileExistsError, match="older salientft that kept no list of its files, so nothing there is "
                                              "deleted; these look like a run's: checkpoint-1, results.json, "
                                              "run_config.json"):
        plan_output(out, cfg, overwrite=True)
    plan = plan_output(out, cfg, resume=True)
    assert plan.adopt == ["checkpoint-1", "results.json", "run_config.json"] and plan.checkpoint == out / "checkpoint-1"
    lock, plan = start_run(out, cfg, plan)
    lock.release()
    assert {"checkpoint-1", "run_config.json", "run_history.json", "results.json"} <= listed(out)
    assert (out / "checkpoint-1" / COMPLETE_MARKER).is_file()
