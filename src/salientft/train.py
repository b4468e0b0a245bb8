"""One training loop for every method, built on the Hugging Face Trainer.

What differs between methods (the dtype of master weights, how the model is made trainable,
callbacks, checkpoint contents, outputs) is asked of ``salientft.methods``; nothing here
branches on a method's name. Precision: ``dtype="bf16"`` keeps frozen weights in bf16,
trainable weights in fp32 and computes under bf16 autocast (dense methods keep fp32 master
weights); ``fp32`` is plain fp32.

Outputs in ``config.output``: ``run_config.json`` (the resolved config, written when training
starts), ``checkpoint-<step>/`` every ``save_steps``, and once the run has finished the method's
``adapter/`` or ``model/``, ``merged/`` with ``merge=True``, ``loss.png`` and, last,
``metrics.json``: a run is finished when its ``metrics.json`` exists. A checkpoint counts only
once its ``salientft_complete`` marker is written, so an interrupted save is never resumed from.

One folder, one run: a folder that holds a run is refused unless ``resume`` (the same run: its
``run_config.json`` must match the new config, see :func:`config_changes`) or ``overwrite`` (the
folder is cleared first, and only if everything in it is salientft's). Everything that needs no
model (these checks, the data, a writable folder) is checked before the model loads; when
training starts, what killed writes left (temporaries, checkpoints without their marker) is
deleted. A checkpoint that cannot be written (a full disk) stops the run with
:class:`OutputWriteError`; the previous checkpoints stay intact.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import resource
import shutil
import time
from pathlib import Path

import torch

from . import methods
from ._io import atomic_path, check_writable, is_temporary, read_json_object, remove_temporaries, write_json
from .config import TrainConfig
from .gift import trainable_parameters
from .models import load_model

log = logging.getLogger(__name__)

COMPLETE_MARKER = "salientft_complete"
RUN_CONFIG = "run_config.json"
# What salientft writes into a run folder (besides checkpoint-<step>/ and atomic-write temporaries),
# the evaluation results `salientft eval`/`compare` keep beside a run and the Trainer's logging folder
# (runs/) included; anything else is the user's.
RUN_FILES = frozenset({RUN_CONFIG, "metrics.json", "loss.png", "adapter", "model", "merged",
                       "eval_before.json", "eval_after.json", "results.json", "runs",
                       "eval_before.samples.jsonl", "eval_after.samples.jsonl"})
# Settings a --resume may change: they do not touch the training (the evaluation around it, how the
# folder is spelled). max_steps may also grow; every other difference is refused.
RESUME_MAY_CHANGE = ("output", "eval_tasks", "eval_limit", "eval_subset", "eval_before", "report_to")  # nothing the weights depend on
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class RunStopped(RuntimeError):
    """Training stopped before the end; the message names the last good checkpoint."""


class NonFiniteLossError(RunStopped):
    """The training loss became NaN or infinite."""


class OutputWriteError(RunStopped):
    """A checkpoint or the finished run's outputs could not be written (a full disk, ...)."""


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint_dirs(output: str | Path) -> list[Path]:
    """Every ``checkpoint-<step>`` folder, complete or not, oldest first."""
    found = []
    for p in Path(output).glob("checkpoint-*"):
        m = _CHECKPOINT.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def complete_checkpoints(output: str | Path) -> list[Path]:
    """Checkpoint folders of a run that finished saving, oldest first."""
    return [p for p in _checkpoint_dirs(output) if (p / COMPLETE_MARKER).is_file()]


def last_good(output: str | Path) -> str:
    """``the last good checkpoint is <path>`` (or that none was written), for stop messages."""
    last = complete_checkpoints(output)
    return f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"


# ----------------------------------------------------------------------------- the output folder


def _is_run_entry(name: str) -> bool:
    return name in RUN_FILES or bool(_CHECKPOINT.fullmatch(name)) or is_temporary(name)


def config_changes(stored: dict, config: TrainConfig) -> list[str]:
    """``field: old -> new`` for every setting of ``config`` that differs from a run's stored
    ``run_config.json`` and that a resume may not change (all but RESUME_MAY_CHANGE and a larger
    ``max_steps``). An unset ``lr`` counts as the method's default, and a field that did not exist
    when the run was stored counts as its default."""
    new = config.to_dict()
    # A field the stored config lacks was added to salientft after that run: it ran with the default.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    old = {**{k: defaults[k] for k in new if k not in stored and k in defaults}, **stored}
    for d in (old, new):
        if d.get("lr") is None:
            try:
                d["lr"] = methods.get(d.get("method"), quantized=d.get("quantized") is not None).default_lr
            except (ValueError, TypeError):
                pass
    changes = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if key in RESUME_MAY_CHANGE or a == b:
            continue
        if key == "max_steps" and isinstance(a, int) and isinstance(b, int) and 0 < a < b:
            continue  # a longer run: the schedule then follows the new total
        changes.append(f"{key}: {a!r} -> {b!r}")
    return changes


def plan_output(out: Path, config: TrainConfig, *, resume: bool = False,
                overwrite: bool = False) -> tuple[Path | None, bool]:
    """Check ``--output`` against the run about to start, writing nothing.

    Returns (the checkpoint to resume from or None, whether the folder is to be cleared). Raises
    when the folder holds another run and neither ``resume`` nor ``overwrite`` is given, when a
    resume's settings differ from the run's (all differences in one message), and when
    ``overwrite`` would delete files salientft did not write.
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run in --output and --overwrite replaces it; give one of them")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output {out} is a file; give a directory path")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    ours = [n for n in entries if _is_run_entry(n) and not is_temporary(n)]
    others = [n for n in entries if not _is_run_entry(n)]
    if resume:
        stored = out / RUN_CONFIG
        if not stored.is_file():
            if complete_checkpoints(out):
                raise FileNotFoundError(
                    f"--resume: {out} has checkpoints but no {RUN_CONFIG} to compare the settings with (a run "
                    "of an older salientft, which wrote it only at the end); start over with --overwrite")
            raise FileNotFoundError(f"--resume: no complete checkpoint-<step> folder in {out}")
        try:
            changes = config_changes(read_json_object(stored, "the run's TrainConfig"), config)
        except ValueError as e:
            raise ValueError(f"--resume: {e}; restore it, or start over with --overwrite") from None
        if changes:
            raise ValueError(
                f"--resume: the settings differ from the run in {out} ({RUN_CONFIG}): {'; '.join(changes)}. "
                "Resume with the run's settings (only --max-steps may grow), or start a new run with "
                "--overwrite or another --output")
        ckpts = complete_checkpoints(out)
        if not ckpts:
            log.warning("--resume: no complete checkpoint in %s yet: the run starts again from step 0", out)
        return (ckpts[-1] if ckpts else None), False
    if not ours:  # new, empty, or only the user's own files (left untouched): a fresh start
        return None, any(is_temporary(n) for n in entries)  # leftovers of no run to resume: deleted
    if not overwrite:
        listing = ", ".join(ours[:5]) + (", ..." if len(ours) > 5 else "")
        raise FileExistsError(
            f"--output {out} already holds a run ({listing}); continue it with --resume, replace it with "
            "--overwrite, or choose another --output")
    if others:
        listing = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise FileExistsError(
            f"--overwrite: {out} also holds files salientft did not write ({listing}), so it is not cleared; "
            "move them away or choose another --output")
    return None, True


def start_run(out: Path, config: TrainConfig, *, clear: bool = False) -> None:
    """Make ``out`` ready for the training that starts now: clear the previous run (``clear``),
    delete what killed writes left (temporaries, checkpoints without their completion marker), and
    record the run's config atomically in ``run_config.json``."""
    if clear:
        for p in out.iterdir():
            if _is_run_entry(p.name):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    complete = set(complete_checkpoints(out))
    for folder in (out, *_checkpoint_dirs(out)):
        for p in remove_temporaries(folder):
            log.info("removed %s, left by an interrupted write", p)
        if folder != out and folder not in complete:
            shutil.rmtree(folder)
            log.info("removed %s, an interrupted checkpoint (no completion marker)", folder)
    write_json(out / RUN_CONFIG, config.to_dict())


def _is_main_process() -> bool:
    """Rank 0 of a distributed run (torchrun sets RANK), or a single process: the one that writes."""
    return int(os.environ.get("RANK", "0")) == 0


def _trainer_classes():
    from transformers import Trainer, TrainerCallback

    class CompleteMarker(TrainerCallback):
        """Mark a checkpoint complete once everything in it has been written."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    with atomic_path(ckpt / COMPLETE_MARKER) as tmp:
                        tmp.write_text(f"{state.global_step}\n")
            return control

    class SalientTrainer(Trainer):
        """Trainer that stops on a non-finite loss, counts tokens, and lets the method write and
        restore the model's part of a checkpoint (GIFT-SW: its compact adapter)."""

        def __init__(self, *a, method, **kw):
            super().__init__(*a, **kw)
            self.salientft_method = method
            self.session_tokens = 0  # this process's tokens since train() started

        def training_step(self, model, inputs, num_items_in_batch=None):
            # Tokens and loss checks accumulate on the device and are read at the next log,
            # checkpoint or the end (``_read_step_checks``): a read per micro-step would stop an
            # accelerator twice per micro-step.
            mask = inputs.get("attention_mask")
            n = mask.sum() if mask is not None else inputs["input_ids"].numel()
            loss = super().training_step(model, inputs, num_items_in_batch)
            d = loss.detach()
            if getattr(self, "_unread_tokens", None) is None:
                self._unread_tokens = torch.zeros((), dtype=torch.int64, device=d.device)
                self._all_finite = torch.ones((), dtype=torch.bool, device=d.device)
                self._bad_step = torch.zeros((), dtype=torch.int64, device=d.device)
                self._bad_loss = torch.zeros((), dtype=torch.float32, device=d.device)
            self._unread_tokens += n
            finite = torch.isfinite(d).all()
            first = self._all_finite & ~finite  # the first non-finite loss since the last read
            self._bad_step = torch.where(first, self.state.global_step + 1, self._bad_step)
            self._bad_loss = torch.where(first, d.float().sum(), self._bad_loss)
            self._all_finite &= finite
            return loss

        def _read_step_checks(self):
            """Count the tokens since the last read and stop on a non-finite loss (one transfer)."""
            if getattr(self, "_unread_tokens", None) is None:
                return
            tokens, finite, step, bad = torch.stack([
                self._unread_tokens.double(), self._all_finite.double(), self._bad_step.double(),
                self._bad_loss.double()]).tolist()
            self._unread_tokens = None
            self.session_tokens += int(tokens)
            # the run's total: saved in each checkpoint's trainer_state.json, restored by --resume
            self.state.num_input_tokens_seen += int(tokens)
            if not finite:
                raise NonFiniteLossError(
                    f"the training loss became {bad} at step {int(step)}; "
                    f"{last_good(self.args.output_dir)}. Lower the learning rate (--lr) or use --dtype fp32"
                )

        def _maybe_log_save_evaluate(self, *args, **kwargs):
            c = self.control
            if c.should_log or c.should_save or c.should_evaluate:  # before a checkpoint holds a bad step
                self._read_step_checks()
            return super()._maybe_log_save_evaluate(*args, **kwargs)

        def train(self, *args, **kwargs):
            out = super().train(*args, **kwargs)
            self._read_step_checks()
            return out

        def _save_checkpoint(self, model, trial):
            try:
                super()._save_checkpoint(model, trial)
            except OSError as e:
                failed = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
                if failed.is_dir() and not (failed / COMPLETE_MARKER).exists():
                    shutil.rmtree(failed, ignore_errors=True)  # never resumed from; free what it took
                raise OutputWriteError(
                    f"could not write {failed.name} ({e.strerror or e}); {last_good(self.args.output_dir)} "
                    "and intact. Free some space, then continue with --resume") from e

        def _save(self, output_dir=None, state_dict=None):
            directory = Path(output_dir or self.args.output_dir)
            if not self.salientft_method.save_checkpoint(self.model, directory):
                super()._save(output_dir, state_dict)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            if not self.salientft_method.load_checkpoint(self.model, Path(resume_from_checkpoint)):
                super()._load_from_checkpoint(resume_from_checkpoint, model)

    return SalientTrainer, CompleteMarker


# ----------------------------------------------------------------------------- preparation


def prepare_model(model, config: TrainConfig, train_dataset=None):
    """Make the model trainable the way ``config.method`` says (in place where possible)."""
    return config.training_method.prepare(model, config, train_dataset)


# ----------------------------------------------------------------------------- run


def _peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def heldout_loss(model, dataset, collator, batch_size: int = 8, limit: int = 200) -> float | None:
    """Mean token loss of ``model`` on (at most ``limit`` examples of) a tokenized dataset.

    None when there is no held-out data (a small file can hash every record into training).
    """
    from torch.utils.data import DataLoader, Subset

    if dataset is None or len(dataset) == 0:
        return None
    ds = Subset(dataset, range(min(limit, len(dataset))))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in DataLoader(ds, batch_size=batch_size, collate_fn=collator):
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            lp = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(lp)
            count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def _plot_loss(history: list[dict], path: Path, title: str) -> bool:
    """Write the loss curve to ``path``; without matplotlib (an optional extra) log a warning and
    write nothing. Returns whether the plot was written."""
    from .deps import PLOTS_INSTALL, module_available

    if not module_available("matplotlib"):
        log.warning("matplotlib is not installed: no %s (%s adds the plots)", path.name, PLOTS_INSTALL)
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, model=None, tokenizer=None,
          callbacks=()) -> dict:
    """Fine-tune ``config.model`` on ``config.data`` with ``config.method``; returns the metrics.

    ``resume``: continue the run in ``config.output`` from its newest complete checkpoint (its
    settings must match, see :func:`config_changes`); ``overwrite``: replace the run there (see
    :func:`plan_output`). ``model``/``tokenizer``: an already loaded base (else loaded from the
    config); ``callbacks``: extra Hugging Face ``TrainerCallback`` objects, run after the method's own.
    """
    extra_callbacks = list(callbacks)
    from transformers import TrainingArguments, set_seed

    from .data.chat import ChatCollator, dataset_from_conversations
    from .data.instruct import load_conversations

    if config.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError(f"--fsdp {config.fsdp} shards across processes: launch with torchrun --nproc_per_node N "
                         "or accelerate launch (see docs/distributed.md)")
    if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() in ("1", "true", "yes"):
        raise ValueError("fsdp_cpu_ram_efficient_loading is on: the ranks other than 0 would get a model on the meta "
                         "device, but every rank prepares the method (salient columns, noise scale, their "
                         "persistent buffers) from real weights. Set fsdp_cpu_ram_efficient_loading: false "
                         "(see docs/distributed.md)")
    # Everything that needs no model first: the output folder, the data, a writable folder.
    out = Path(config.output)
    main_process = _is_main_process()
    if main_process:
        checkpoint, clear = plan_output(out, config, resume=resume, overwrite=overwrite)
    else:  # the main process checks and prepares the folder; the others only find the checkpoint
        ckpts = complete_checkpoints(out) if resume else []
        checkpoint, clear = (ckpts[-1] if ckpts else None), False
    train_convs = load_conversations(config.data, split="train", limit=config.data_limit, seed=config.seed)
    try:
        held_convs = load_conversations(config.data, split="heldout", limit=200, seed=0)  # same items for every seed
    except ValueError:
        held_convs = None  # a small file can hash every record into training
    if main_process:
        check_writable(out, kind="dir", flag="--output")
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)

    set_seed(config.seed)
    method = config.training_method
    if model is None:
        model, tokenizer = load_model(method.base_source(config), dtype=method.master_dtype(config),
                                      trust_remote_code=config.trust_remote_code)
    train_ds = dataset_from_conversations(train_convs, tokenizer, max_length=config.max_length,
                                          packing=config.packing)
    try:
        held_ds = (dataset_from_conversations(held_convs, tokenizer, max_length=config.max_length)
                   if held_convs else None)
    except (ValueError, KeyError):
        held_ds = None
    collator = ChatCollator(tokenizer)
    result: dict = {"method": config.method, "model": config.model, "data": config.data}
    if config.eval_before:
        result["heldout_loss_before"] = heldout_loss(model, held_ds, collator)
    eval_before = _evaluate(model, tokenizer, config, out, "eval_before") if config.eval_tasks and config.eval_before else None

    set_seed(config.seed)
    model = method.prepare(model, config, train_ds)
    if config.gradient_checkpointing:
        model.config.use_cache = False
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    counts = trainable_parameters(model)
    callbacks = method.callbacks(config)
    SalientTrainer, CompleteMarker = _trainer_classes()
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        seed=config.seed,
        bf16=config.dtype == "bf16",
        fp16=config.dtype == "fp16",
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        fsdp=bool(config.fsdp),
        fsdp_config=_fsdp_config(config) if config.fsdp else None,
        report_to=_report_to(config.report_to),
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        logging_nan_inf_filter=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    trainer = SalientTrainer(
        model=model, args=args, train_dataset=train_ds, data_collator=collator,
        callbacks=[CompleteMarker(), *callbacks, *extra_callbacks], method=method,
    )
    fsdp_asked = config.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"  # accelerate config
    if fsdp_asked and not trainer.is_fsdp_enabled:
        raise ValueError(
            f"FSDP (--fsdp {config.fsdp or '<accelerate config>'}): the Trainer did not turn it on. It needs several processes "
            "(torchrun / accelerate launch) on accelerators: accelerate runs FSDP on GPUs (and other "
            "accelerators), not on CPU processes, where it would silently be DDP. For DDP drop --fsdp (or use "
            "configs/accelerate/ddp_cpu.yaml); see docs/distributed.md"
        )
    if main_process:
        start_run(out, config, clear=clear)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    wall = time.perf_counter() - t0
    model = trainer.model
    if trainer.is_fsdp_enabled:  # every rank takes part in the gather
        model = _unsharded(trainer, config, train_ds)
    if not trainer.is_world_process_zero():
        return result

    history = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    result.update({
        "train_loss": history,
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "trainable_fraction": counts["fraction"],
        "steps": trainer.state.global_step,
        "wall_time_s": wall,
        "tokens_seen": trainer.state.num_input_tokens_seen,  # the whole run's, across resumes
        "tokens_per_s": trainer.session_tokens / wall if wall > 0 else None,
        "peak_memory_bytes": _peak_memory_bytes(),
        "learning_rate": config.learning_rate,
        "resumed_from": str(checkpoint) if checkpoint else None,
    })
    if callbacks:
        result["kept_fraction"] = [
            {"step": h["step"], "kept_fraction": h["kept_fraction"]}
            for h in trainer.state.log_history if "kept_fraction" in h
        ]
    result["heldout_loss_after"] = heldout_loss(model, held_ds, collator)
    if config.eval_tasks:
        if eval_before is not None:
            result["eval_before"] = eval_before
        result["eval_after"] = _evaluate(model, tokenizer, config, out, "eval_after")
    try:
        method.save_final(model, tokenizer, config, out)
        if history:
            _plot_loss(history, out / "loss.png", f"{config.method} on {config.model}")
        write_json(out / "metrics.json", result)  # last: marks the run finished
    except OSError as e:
        raise OutputWriteError(f"could not write the finished run into {out} ({e.strerror or e}); "
                               f"{last_good(out)}. Free some space, then rerun with --resume") from e
    return result


def _unsharded(trainer, config: TrainConfig, train_ds):
    """FSDP: the trained model as one unsharded model on rank 0 (None on the other ranks).

    The full state dict is gathered from the shards once, on rank 0 (a collective); rank 0 then
    loads the base again, repeats the method's preparation with the run's seed and loads that
    state into it. Evaluation, the outputs and merges then work on full weights, never on shards
    (an in-place merge of a DTensor shard raises; a forward of a sharded model on rank 0 alone
    would wait for the other ranks forever).
    """
    from transformers import set_seed

    state = trainer.accelerator.get_state_dict(trainer.model)
    if not trainer.is_world_process_zero():
        return None
    method = config.training_method
    model, _ = load_model(method.base_source(config), dtype=method.master_dtype(config),
                          trust_remote_code=config.trust_remote_code)
    set_seed(config.seed)
    model = method.prepare(model, config, train_ds)
    model.load_state_dict(state)
    return model


def _fsdp_config(config: TrainConfig) -> dict:
    """TrainingArguments.fsdp_config of ``--fsdp``: FSDP2 (``fully_shard``) on every decoder layer
    (the model's ``_no_split_modules``) and the root; full state dicts gathered on rank 0 for the
    checkpoints; weights loaded on every rank (no ``cpu_ram_efficient_loading``, see
    docs/distributed.md)."""
    return {
        "version": 2,
        "reshard_after_forward": config.fsdp == "full_shard",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": False,
    }


def _report_to(value: str):
    """TrainConfig.report_to as the Trainer takes it: "none", or a list of tracker names."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    return "none" if names in ([], ["none"]) else names


def _evaluate(model, tokenizer, config: TrainConfig, out: Path, name: str) -> dict:
    """Evaluate, and write ``<name>.json`` and its per-item ``<name>.samples.jsonl`` into the run
    folder (each atomically), so that ``salientft compare`` pairs two runs item by item."""
    from .evaluation import evaluate
    from .evaluation.cli_api import sample_records, samples_path, write_samples

    report = evaluate(model, tokenizer, config.eval_tasks, limit=config.eval_limit, subset=config.eval_subset,
                      return_items=True)
    records = sample_records(report)
    for res in report["results"].values():
        res.pop("items", None)
    if _is_main_process():
        report["samples"] = write_samples(samples_path(out / f"{name}.json"), records).name
        write_json(out / f"{name}.json", report)
    return report


def load_run(run_dir: str | Path, dtype="bf16"):
    """(model, tokenizer) of a finished run: its full or merged model, or base + adapter."""
    from .evaluation.loading import load_for_eval

    model, tok, _ = load_for_eval(str(run_dir), dtype=dtype)
    return model, tok


__all__ = ["train", "prepare_model", "load_run", "complete_checkpoints", "RunStopped", "NonFiniteLossError",
           "OutputWriteError", "heldout_loss", "plan_output", "start_run", "config_changes", "last_good"]


def resolve_train_config(config_file: str | None, flags: dict) -> TrainConfig:
    """The run's config: the YAML/JSON file's fields, overridden by the flags given."""
    values: dict = {}
    if config_file:
        import yaml

        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"--config {config_file}: no such file")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"--config {config_file} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ValueError(f"--config {config_file} must hold a mapping of TrainConfig fields")
    values.update(flags)
    try:
        return TrainConfig.from_dict(values)
    except ValueError as e:
        if config_file and not set(values) <= {f.name for f in dataclasses.fields(TrainConfig)}:
            raise ValueError(f"--config {config_file}: {e}") from None  # the file's unknown fields
        raise


def _fmt(v, spec=".4f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_summary(result: dict, output: str) -> str:
    """A before/after Markdown table of a finished run."""
    lines = [
        f"## {result['method']} on {result['model']} ({result.get('steps', 0)} steps, "
        f"{result.get('wall_time_s', 0):.0f} s, {result.get('trainable_params', 0):,} trainable parameters)",
        "",
        "| metric | before | after |",
        "|---|---|---|",
        f"| held-out loss | {_fmt(result.get('heldout_loss_before'))} | {_fmt(result.get('heldout_loss_after'))} |",
    ]
    before, after = result.get("eval_before") or {}, result.get("eval_after") or {}
    for task, r in (after.get("results") or {}).items():
        b = (before.get("results") or {}).get(task, {})
        key = "acc_norm" if r.get("acc_norm") is not None and task in ("hellaswag", "arc_easy", "arc_challenge", "piqa", "openbookqa") else "acc"
        lines.append(f"| {task} {key} (n={r.get('n')}) | {_fmt(b.get(key))} | {_fmt(r.get(key))} |")
    if after.get("paper_avg") is not None:
        lines.append(f"| paper six-task average | {_fmt(before.get('paper_avg'))} | {_fmt(after.get('paper_avg'))} |")
    lines += ["", f"Outputs in {output}/ (metrics.json, loss.png, run_config.json)."]
    return "\n".join(lines)
