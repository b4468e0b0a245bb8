"""The life of a training run's folder (``train --output``): what may start there, what a resume
may change, the lock held while the run writes, and the record of the run.

- **One folder, one run, one writer.** :func:`plan_output` (before the model loads, writing
  nothing) refuses a folder that holds files salientft did not write, a folder held by another
  salientft process (its PID named), a second run without ``--resume``/``--overwrite``, and a
  resume whose settings differ. :func:`start_run` (when training starts) takes the folder's lock
  (``outputs.FolderLock``, held until the run ends; a lock left by a killed run is taken over),
  checks the folder again under it, clears it for ``--overwrite`` (only what the manifest lists),
  removes what killed writes left and writes ``run_config.json``.
- **What salientft wrote** is the folder's manifest (``salientft.outputs``). A run folder of a
  salientft that kept no manifest (*legacy*: it has ``run_config.json`` and no manifest) is
  recognised by the names that salientft wrote (``LEGACY_RUN_FILES``, ``checkpoint-<step>``): a
  ``--resume`` adopts them into a new manifest; ``--overwrite`` deletes nothing and lists them.
- **The record of the run**: ``run_config.json`` holds the TrainConfig (``TrainConfig.from_json``
  reads it back; the method's settings nested under ``method_config``, GMT's mask under ``mask``;
  the flat files of earlier versions are read too, and a resume compares both as flat settings); ``run_history.json`` beside it the data file's SHA-256 (``data_sha256``; a resume
  with a changed file is refused, however its path is spelled) and ``history``, one entry per
  start or resume with the settings the resume changed (the config then holds the new values).
- **Resume.** A finished run (``metrics.json``) is not trained again unless ``--max-steps`` grows;
  a resume may lower ``--lr`` and switch ``--dtype`` to fp32 (what a non-finite loss advises).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import shutil
import time
from pathlib import Path

from . import methods, outputs
from ._io import is_path_like, read_json_object, remove_temporaries, write_json
from .config import TrainConfig, settings_of

log = logging.getLogger(__name__)

COMPLETE_MARKER = "salientft_complete"
RUN_CONFIG = "run_config.json"
RUN_HISTORY = "run_history.json"  # the record of the run beside its config (RUN_RECORD)
METRICS = "metrics.json"
# What a salientft without manifests wrote into a run folder (besides checkpoint-<step>/): how a legacy
# run folder is recognised for --resume, and listed (never deleted) for --overwrite.
LEGACY_RUN_FILES = frozenset({RUN_CONFIG, RUN_HISTORY, METRICS, "loss.png", "adapter", "model", "merged",
                              "eval_before.json", "eval_after.json", "results.json", "runs",
                              "eval_before.samples.jsonl", "eval_after.samples.jsonl"})
# Settings a --resume may change: they do not touch the training (the evaluation around it, how the
# folder is spelled). max_steps may also grow, lr be lowered and dtype become fp32 (RESUME_MAY_ADJUST);
# every other difference is refused.
RESUME_MAY_CHANGE = ("output", "eval_tasks", "eval_limit", "eval_subset", "eval_before", "report_to",  # nothing the weights depend on
                     "device",  # a run may move to another GPU or machine (docs/ARCHITECTURE.md, devices)
                     "sequential_calibration")  # GIFT-SW: the same scores either way (docs/quantization.md)
# What run_history.json holds: the record of the run, not settings (run_config.json stays a TrainConfig
# that TrainConfig.from_json reads back).
RUN_RECORD = ("data_sha256", "history")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(output: str | Path) -> list[Path]:
    """Every ``checkpoint-<step>`` folder, complete or not, oldest first."""
    found = []
    for p in Path(output).glob("checkpoint-*"):
        m = _CHECKPOINT.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def complete_checkpoints(output: str | Path) -> list[Path]:
    """Checkpoint folders of a run that finished saving, oldest first."""
    return [p for p in checkpoint_dirs(output) if (p / COMPLETE_MARKER).is_file()]


def last_good(output: str | Path) -> str:
    """``the last good checkpoint is <path>`` (or that none was written), for stop messages."""
    last = complete_checkpoints(output)
    return f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"


def discard_checkpoint(out: Path, folder: Path) -> None:
    """Delete a checkpoint folder (interrupted, or holding weights that cannot be trusted) and its
    manifest entry; best effort on the manifest, which a full disk may keep from being rewritten."""
    shutil.rmtree(folder, ignore_errors=True)
    try:
        outputs.forget(out, folder.name)
    except OSError:
        pass


# ----------------------------------------------------------------------------- the data file


def data_sha256(source: str) -> str | None:
    """SHA-256 of a local data file's bytes; None for the embedded data and hub datasets."""
    if not isinstance(source, str) or source == "embedded" or source.startswith("hf:") or not is_path_like(source):
        return None
    p = Path(source).expanduser()
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _same_path(a, b) -> bool:
    try:
        return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


# ----------------------------------------------------------------------------- resume


def _lr(d: dict):
    if d.get("lr") is None:
        try:
            return methods.get(d.get("method"), quantized=d.get("quantized") is not None).default_lr
        except (ValueError, TypeError):
            return None
    return d["lr"]


def _settings(d: dict) -> dict:
    """A stored or new config as the flat settings the run trains with (``config.settings_of``: the
    method's own and the mask's; absent ones at their default), an unset ``lr`` as the method's."""
    out = settings_of({k: v for k, v in d.items() if k not in RUN_RECORD})
    lr = _lr(out)
    if lr is not None:
        out["lr"] = lr
    return out


def _adjustment(key: str, a, b) -> bool:
    """Whether a resume may make the change ``key: a -> b`` (recorded in the run's history)."""
    if key == "max_steps":
        return isinstance(a, int) and isinstance(b, int) and 0 < a < b  # a longer run: the schedule follows
    if key == "lr":
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and 0 < b < a  # after a non-finite loss
    return key == "dtype" and b == "fp32"  # full precision (after a non-finite loss in bf16/fp16)


def _compare(stored: dict, config: TrainConfig) -> tuple[list[str], list[str]]:
    """(refused differences, allowed adjustments), each as ``field: old -> new``. The stored config
    may be the flat ``run_config.json`` of an earlier version: both sides are read as flat settings."""
    old, new = _settings(stored), _settings(config.to_dict())
    if old.get("mask_ratio") is None or new.get("mask_ratio") is None:  # a mask on one side only: its ratio says it
        for d in (old, new):
            for key in [k for k in d if k.startswith("mask_") and k != "mask_ratio"]:
                del d[key]
    refused, adjusted = [], []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if key in RESUME_MAY_CHANGE or a == b:
            continue
        change = f"{key}: {a!r} -> {b!r}"
        if _adjustment(key, a, b):
            adjusted.append(change)
        elif key == "data" and _same_data(stored, a, b):
            continue
        elif key == "data" and stored.get("data_sha256") and _same_path(a, b):
            refused.append(f"data: {b} changed since the run started (SHA-256 {stored['data_sha256'][:12]}... -> "
                           f"{(data_sha256(b) or 'unreadable')[:12]}...)")
        else:
            refused.append(change)
    if "data" not in [c.split(":")[0] for c in refused] and stored.get("data_sha256"):
        now = data_sha256(new.get("data"))
        if now is not None and now != stored["data_sha256"]:
            refused.append(f"data: {new.get('data')} changed since the run started (SHA-256 "
                           f"{stored['data_sha256'][:12]}... -> {now[:12]}...)")
    return refused, adjusted


def _same_data(stored: dict, a, b) -> bool:
    """Two spellings of the run's data: the same file content when the run recorded it (a moved or
    differently spelled file), else the same resolved path."""
    digest = stored.get("data_sha256")
    if digest:
        return data_sha256(b) == digest
    return isinstance(a, str) and isinstance(b, str) and is_path_like(a) and is_path_like(b) and _same_path(a, b)


def config_changes(stored: dict, config: TrainConfig) -> list[str]:
    """``field: old -> new`` for every setting of ``config`` that differs from a run's stored
    ``run_config.json`` and that a resume may not change: all but RESUME_MAY_CHANGE, a larger
    ``max_steps``, a lower ``lr``, ``dtype`` fp32 and the same data spelled differently (the data
    file's content is compared with the recorded ``data_sha256``). An unset ``lr`` counts as the
    method's default, and a field that did not exist when the run was stored counts as its default."""
    return _compare(stored, config)[0]


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Plan:
    """What :func:`plan_output` decided for ``--output``."""

    resume: bool = False
    overwrite: bool = False
    checkpoint: Path | None = None  # resume from it
    clear: bool = False  # delete what the manifest lists first (--overwrite)
    complete: dict | None = None  # --resume of a finished run: its metrics; nothing is to be done
    adjusted: list[str] = dataclasses.field(default_factory=list)  # what this resume changes
    adopt: list[str] = dataclasses.field(default_factory=list)  # a legacy run's entries, to record


def _listing(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def _legacy_entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()
                  if p.name in LEGACY_RUN_FILES or _CHECKPOINT.fullmatch(p.name))


def plan_output(out: Path, config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                locked: bool = False) -> Plan:
    """Check ``--output`` against the run about to start, writing nothing; returns the :class:`Plan`.

    Raises when the folder holds files salientft did not write, is held by another process, holds
    another run and neither ``resume`` nor ``overwrite`` is given, when a resume's settings differ
    from the run's (all differences in one message), or when ``overwrite`` meets a legacy run.
    ``locked``: this process holds the folder's lock (the check again in :func:`start_run`).
    """
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume continues the run in --output and --overwrite replaces it; give one of them")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output {out} is a file; give a directory path")
    plan = Plan(resume=resume, overwrite=overwrite)
    if not out.is_dir():
        if resume:
            raise FileNotFoundError(f"--resume: no complete checkpoint-<step> folder in {out}")
        return plan
    if not locked:
        pid = outputs.FolderLock.holder(out)
        if pid is not None:
            raise FileExistsError(f"--output {out} is in use by another salientft process (PID {pid}); wait for it "
                                  "to finish, stop it, or choose another --output")
    manifest = outputs.listed(out)
    # a run of a salientft without manifests (its folder may since have got one from `eval --output` into it)
    legacy = (out / RUN_CONFIG).is_file() and RUN_CONFIG not in (manifest or set())
    ours = _refuse_foreign(out, manifest, legacy, resume, overwrite)
    if resume:
        return _plan_resume(out, config, plan, legacy)
    if not ours:  # new, empty, or only what killed writes left
        plan.clear = bool(manifest)
        return plan
    if not overwrite:
        if legacy:
            raise FileExistsError(
                f"--output {out} already holds a run ({_listing(ours)}) of an older salientft; continue it with "
                "--resume or choose another --output")
        raise FileExistsError(
            f"--output {out} already holds a run ({_listing(ours)}); continue it with --resume, replace it with "
            "--overwrite, or choose another --output")
    if legacy:
        raise FileExistsError(
            f"--overwrite: {out} was written by an older salientft that kept no list of its files, so nothing there "
            f"is deleted; these look like a run's: {', '.join(ours)}. Delete them yourself, or choose another --output")
    plan.clear = True
    return plan


def _refuse_foreign(out: Path, manifest, legacy: bool, resume: bool, overwrite: bool) -> list[str]:
    """The names of what salientft wrote in ``out``; refuses a folder that also holds other files
    (unless a new run only adds to a folder without any of ours)."""
    known = (manifest or set()) | (set(_legacy_entries(out)) if legacy else set())
    others = outputs.foreign(out, known)
    ours = sorted(p.name for p in out.iterdir() if p.name in known)
    if others and (resume or overwrite or not ours):
        what = "--resume" if resume else "--overwrite" if overwrite else "--output"
        raise FileExistsError(
            f"{what}: {out} holds files salientft did not write ({_listing(others)}), so nothing is written there; "
            "move them away or choose another --output")
    return ours


def _plan_resume(out: Path, config: TrainConfig, plan: Plan, legacy: bool) -> Plan:
    stored_path = out / RUN_CONFIG
    if not stored_path.is_file():
        if complete_checkpoints(out):
            raise FileNotFoundError(
                f"--resume: {out} has checkpoints but no {RUN_CONFIG} to compare the settings with (a run of an "
                "older salientft, which wrote it only at the end); start over in another --output")
        raise FileNotFoundError(f"--resume: no complete checkpoint-<step> folder in {out}")
    try:
        stored = read_run(out)
        refused, plan.adjusted = _compare(stored, config)
    except ValueError as e:
        raise ValueError(f"--resume: {e}; restore it, or start over in another --output") from None
    if refused:
        raise ValueError(
            f"--resume: the settings differ from the run in {out} ({RUN_CONFIG}): {'; '.join(refused)}. Resume with "
            "the run's settings (only --max-steps may grow, --lr be lowered, --dtype become fp32), or start a new run "
            "with --overwrite or another --output")
    if legacy:
        plan.adopt = _legacy_entries(out)
    ckpts = complete_checkpoints(out)
    plan.checkpoint = ckpts[-1] if ckpts else None
    if (out / METRICS).is_file():
        metrics = read_json_object(out / METRICS, "the finished run's metrics")
        steps = metrics.get("steps")
        if config.max_steps <= 0 or not isinstance(steps, int) or steps >= config.max_steps:
            plan.complete = metrics
            return plan
        if plan.checkpoint is None:
            raise FileNotFoundError(
                f"--resume: the run in {out} is finished ({steps} steps) and kept no checkpoint to continue from "
                "(it ran with --save-steps 0); train a longer run with --overwrite or another --output")
    if plan.checkpoint is None:
        log.warning("--resume: no complete checkpoint in %s yet: the run starts again from step 0", out)
    return plan


# ----------------------------------------------------------------------------- the start


def read_run(out: Path) -> dict:
    """The run's stored config with its record (``data_sha256``, ``history``) when it has one."""
    stored = read_json_object(Path(out) / RUN_CONFIG, "the run's TrainConfig")
    if (Path(out) / RUN_HISTORY).is_file():
        record = read_json_object(Path(out) / RUN_HISTORY, "the run's history")
        stored.update({k: record[k] for k in RUN_RECORD if k in record})
    return stored


def _record(config: TrainConfig, previous: dict | None, plan: Plan) -> dict:
    history = list((previous or {}).get("history") or []) if plan.resume else []
    entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": "resumed" if plan.resume else "started"}
    if plan.resume:
        entry["from_checkpoint"] = plan.checkpoint.name if plan.checkpoint else None
        entry["changes"] = plan.adjusted
    history.append(entry)
    return {**config.to_dict(), "data_sha256": data_sha256(config.data), "history": history}


def start_run(out: Path, config: TrainConfig, plan: Plan) -> tuple[outputs.FolderLock, Plan]:
    """Make ``out`` ready for the training that starts now and return (the folder's lock, held;
    release it when the run ends, and the plan checked again under it). Under the lock: the folder
    is checked again (it may have changed while the model loaded), cleared for ``--overwrite``
    (only what its manifest lists), cleaned of what killed writes left (temporaries, checkpoints
    without their completion marker), and the run is recorded in ``run_config.json`` and ``run_history.json``."""
    out = Path(out)
    lock = outputs.FolderLock(out).acquire()
    try:
        if lock.stale_pid:
            log.info("took over the lock of %s from PID %s, a run that was stopped", out, lock.stale_pid)
        previous = None
        if plan.resume and (out / RUN_CONFIG).is_file():
            previous = read_run(out)
        plan = plan_output(out, config, resume=plan.resume, overwrite=plan.overwrite, locked=True)
        if plan.complete is not None:
            raise FileExistsError(f"--output {out}: another process finished this run while the model loaded")
        if plan.adopt:
            outputs.record(out, *plan.adopt)
        if plan.clear:
            outputs.clear(out)
        complete = set(complete_checkpoints(out))
        for p in outputs.remove_stale(out):
            log.info("removed %s, left by an interrupted write", p)
        for folder in checkpoint_dirs(out):
            if folder not in complete:
                discard_checkpoint(out, folder)
                log.info("removed %s, an interrupted checkpoint (no completion marker)", folder)
            else:
                for p in remove_temporaries(folder):
                    log.info("removed %s, left by an interrupted write", p)
        names = [RUN_CONFIG, RUN_HISTORY] + (["runs"] if "tensorboard" in config.report_to else [])
        outputs.record(out, *names)
        run = _record(config, previous, plan)
        write_json(out / RUN_HISTORY, {k: run[k] for k in RUN_RECORD})
        write_json(out / RUN_CONFIG, {k: v for k, v in run.items() if k not in RUN_RECORD})
    except BaseException:
        lock.release()
        raise
    return lock, plan
