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

The run folder's life (one run and one writer per folder, the manifest of what salientft wrote,
the lock, what a resume may change, the record in ``run_config.json``) is ``salientft.runfolder``;
everything that needs no model is checked before the model loads. A checkpoint or output that
cannot be written (a full disk, an I/O error, whatever library raised it) stops the run with
:class:`OutputWriteError`, the half-written checkpoint deleted; SIGINT/SIGTERM save a checkpoint
at the next step boundary and stop with :class:`Interrupted`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import resource
import time
from pathlib import Path

import torch

from . import outputs
from ._io import atomic_path, check_writable, write_json
from .config import TrainConfig
from .devices import describe_device, device_name, model_device, resolve_device
from .runfolder import (COMPLETE_MARKER, RESUME_MAY_CHANGE, RUN_CONFIG, Plan, complete_checkpoints, config_changes,
                        discard_checkpoint, last_good, plan_output, start_run)
from .gift import trainable_parameters
from .models import load_model

log = logging.getLogger(__name__)

class RunStopped(RuntimeError):
    """Training stopped before the end; the message names the last good checkpoint."""


class NonFiniteLossError(RunStopped):
    """The training loss became NaN or infinite."""


class OutputWriteError(RunStopped):
    """A checkpoint or the finished run's outputs could not be written (a full disk, ...)."""


class Interrupted(RunStopped):
    """SIGINT or SIGTERM stopped the run at a step boundary (``signum``), after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _is_main_process() -> bool:
    """Rank 0 of a distributed run (torchrun sets RANK), or a single process: the one that writes."""
    return int(os.environ.get("RANK", "0")) == 0


def _trainer_classes():
    from transformers import Trainer, TrainerCallback

    from .methods.sharding import own_fsdp_checkpoint, without_fsdp_model_file

    class CompleteMarker(TrainerCallback):
        """Mark a checkpoint complete once everything in it has been written."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    try:
                        with atomic_path(ckpt / COMPLETE_MARKER) as tmp:
                            tmp.write_text(f"{state.global_step}\n")
                    except Exception as e:
                        raise _checkpoint_write_error(Path(args.output_dir), ckpt, e) from e
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
            out = Path(self.args.output_dir)
            folder = out / f"checkpoint-{self.state.global_step}"
            _check_finite_weights(self.model, self.state.global_step, out)  # never mark non-finite weights good
            try:
                if self.is_world_process_zero():
                    outputs.record(out, folder.name)  # before it exists: even a killed write is known as ours
                super()._save_checkpoint(model, trial)
            except Exception as e:
                raise _checkpoint_write_error(out, folder, e) from e

        def _load_optimizer_and_scheduler(self, checkpoint):
            wanted = list(getattr(self.lr_scheduler, "base_lrs", []))  # this run's --lr, before the states load
            super()._load_optimizer_and_scheduler(checkpoint)
            stored = list(getattr(self.lr_scheduler, "base_lrs", []))
            if checkpoint is not None and wanted and stored and max(stored) > 0:
                _rescale_learning_rate(self.optimizer, self.lr_scheduler, max(wanted) / max(stored))

        def save_model(self, output_dir=None, _internal_call=False):
            # FSDP: a method that writes its own checkpoint (GIFT-SW: the trained columns only) needs
            # neither the Trainer's full state dict nor its full-model file (methods/sharding.py)
            self.salientft_own_checkpoint = own_fsdp_checkpoint(self, output_dir, _internal_call)
            if not self.salientft_own_checkpoint:
                super().save_model(output_dir, _internal_call)

        def _save_optimizer_and_scheduler(self, output_dir):
            with without_fsdp_model_file(getattr(self, "salientft_own_checkpoint", False)):
                super()._save_optimizer_and_scheduler(output_dir)

        def _save(self, output_dir=None, state_dict=None):
            directory = Path(output_dir or self.args.output_dir)
            if not self.salientft_method.save_checkpoint(self.model, directory):
                super()._save(output_dir, state_dict)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            if not self.salientft_method.load_checkpoint(self.model, Path(resume_from_checkpoint)):
                super()._load_from_checkpoint(resume_from_checkpoint, model)

    return SalientTrainer, CompleteMarker


def _checkpoint_write_error(out: Path, folder: Path, e: Exception) -> Exception:
    """A failed checkpoint write as OutputWriteError when the storage failed (a full disk, an I/O
    error, whatever library raised it), after deleting the half-written checkpoint; ``e`` as it is
    otherwise (a bug must not look like a full disk)."""
    reason = outputs.write_failure(e)
    if reason is None:
        return e
    if folder.is_dir() and not (folder / COMPLETE_MARKER).exists():
        discard_checkpoint(out, folder)  # never resumed from; free what it took
    return OutputWriteError(f"could not write {folder.name} ({reason}); {last_good(out)} and intact. Free some space, "
                            "then continue with --resume")


def _check_finite_weights(model, step: int, out: Path) -> None:
    """Refuse to save a checkpoint whose trainable weights are not all finite (one host sync per
    checkpoint): the last good checkpoint stays the newest one that can be resumed from."""
    checks = [torch.isfinite(getattr(p, "to_local", lambda: p)()).all() for p in model.parameters() if p.requires_grad]
    if checks and not bool(torch.stack(checks).all()):
        raise NonFiniteLossError(f"the trained weights became non-finite at step {step}; {last_good(out)}. "
                                 + _nonfinite_advice(out))


def _nonfinite_advice(out: Path) -> str:
    """What a non-finite loss or weight leaves the user to do; exactly what --resume accepts."""
    where = "from it" if complete_checkpoints(out) else "from step 0"
    try:
        fp32 = json.loads((out / RUN_CONFIG).read_text()).get("dtype") == "fp32"
    except (OSError, ValueError, AttributeError):
        fp32 = False
    return (f"Continue {where} with a lower learning rate (--resume --lr <lower>)"
            + ("" if fp32 else " or in full precision (--resume --dtype fp32)"))


def _rescale_learning_rate(optimizer, scheduler, factor: float) -> None:
    """After a resume's optimizer and scheduler states were loaded: follow a lowered ``--lr``
    (``factor`` = new / stored; the states hold the learning rate the run started with), keeping
    the schedule's position. A resume at the same rate changes nothing (factor 1)."""
    if factor == 1.0 or not hasattr(scheduler, "base_lrs"):
        return
    scheduler.base_lrs = [b * factor for b in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


# Test hook (fault injection): "<step>:<SIGINT|SIGTERM>" makes a training process send itself that
# signal at the end of optimizer step <step>, so a test interrupts it at a known moment. Unset in normal use.
TEST_SIGNAL_ENV = "SALIENTFT_TEST_SIGNAL"


def _signal_callback(received: list):
    """A Trainer callback that, once SIGINT/SIGTERM was received (``received`` non-empty), saves a
    checkpoint at the step boundary and stops the training."""
    import signal

    from transformers import TrainerCallback

    hook = os.environ.get(TEST_SIGNAL_ENV, "")
    at_step, _, name = hook.partition(":")

    class StopOnSignal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if at_step and state.global_step == int(at_step):
                os.kill(os.getpid(), getattr(signal, name or "SIGINT"))
            if received:
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopOnSignal()


# ----------------------------------------------------------------------------- preparation


def prepare_model(model, config: TrainConfig, train_dataset=None):
    """Make the model trainable the way ``config.method`` says (in place where possible)."""
    return config.training_method.prepare(model, config, train_dataset)


# ----------------------------------------------------------------------------- run


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def heldout_loss(model, dataset, collator, batch_size: int = 8, limit: int = 200,
                 fingerprint: str | None = None) -> float | None:
    """Mean token loss of ``model`` on (at most ``limit`` examples of) a tokenized dataset.

    None when there is no held-out data (a small file can hash every record into training).
    ``fingerprint``: the model's ``evaluation.cache.model_fingerprint``; given, the loss is read
    from (or stored in) the measure cache, keyed also by the examples themselves.
    """
    from torch.utils.data import DataLoader, Subset

    if dataset is None or len(dataset) == 0:
        return None
    if fingerprint is not None:
        import hashlib
        import inspect
        import json

        from .evaluation import cache

        n = min(limit, len(dataset))
        examples = hashlib.sha256(json.dumps([[dataset[i]["input_ids"], dataset[i]["labels"]]
                                              for i in range(n)]).encode()).hexdigest()
        fields = {"model": fingerprint, "device": next(model.parameters()).device.type, "examples": examples,
                  "batch_size": batch_size, "limit": limit, "pad": getattr(collator, "pad_token_id", None),
                  "code": cache.code_version("heldout", inspect.getsource(heldout_loss))}
        return cache.cached("heldout", fields, lambda: heldout_loss(model, dataset, collator, batch_size, limit))[0]
    ds = Subset(dataset, range(min(limit, len(dataset))))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # summed on the model's device and read once at the end: no host sync per batch
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for batch in DataLoader(ds, batch_size=batch_size, collate_fn=collator):
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            lp = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += lp
            count += (labels != -100).sum()
    model.train(was_training)
    return float(total) / max(int(count), 1)


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
    settings must match, see :func:`config_changes`); a finished run is not trained again: its
    stored metrics are returned with ``already_complete`` set. ``overwrite``: replace the run there
    (see :func:`plan_output`). ``model``/``tokenizer``: an already loaded base (else loaded from the
    config); ``callbacks``: extra Hugging Face ``TrainerCallback`` objects, run after the method's own.

    The folder's lock is held from the start of the training to the end of the outputs. SIGINT and
    SIGTERM during the training save a checkpoint at the next step boundary and raise
    :class:`Interrupted`; a non-finite loss raises :class:`NonFiniteLossError`, after deleting the
    checkpoint whose weights gave it.
    """
    from contextlib import ExitStack

    with ExitStack() as stack:
        try:
            return _train(config, stack, resume=resume, overwrite=overwrite, model=model, tokenizer=tokenizer,
                          callbacks=callbacks)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(_nonfinite_stop(Path(config.output), str(e))) from None


def _nonfinite_stop(out: Path, message: str) -> str:
    """The message of a non-finite loss at step s, once the checkpoint of step s - 1 is deleted:
    its weights gave that loss (whatever the learning rate, the same batch would give it again)."""
    m = re.match(r"the training loss became (\S+) at step (\d+)", message)
    if m is None or not _is_main_process():
        return message
    tainted = out / f"checkpoint-{int(m.group(2)) - 1}"
    gone = ""
    if tainted.is_dir():
        discard_checkpoint(out, tainted)
        gone = f" ({tainted.name}, whose weights gave it, was deleted)"
    return f"{m.group(0)}{gone}; {last_good(out)}. {_nonfinite_advice(out)}"


def _train(config: TrainConfig, stack, *, resume: bool = False, overwrite: bool = False, model=None, tokenizer=None,
           callbacks=()) -> dict:
    extra_callbacks = list(callbacks)
    from transformers import set_seed

    from .data.chat import ChatCollator
    from .data.instruct import load_conversations

    if config.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError(f"--fsdp {config.fsdp} shards across processes: launch with torchrun --nproc_per_node N "
                         "or accelerate launch (see docs/distributed.md)")
    device = resolve_device(config.device)  # misspelled or absent: refused before any work
    if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() in ("1", "true", "yes"):
        raise ValueError("fsdp_cpu_ram_efficient_loading is on: the ranks other than 0 would get a model on the meta "
                         "device, but every rank prepares the method (salient columns, noise scale, their "
                         "persistent buffers) from real weights. Set fsdp_cpu_ram_efficient_loading: false "
                         "(see docs/distributed.md)")
    # Everything that needs no model first: the output folder, the data, a writable folder.
    out = Path(config.output)
    main_process = _is_main_process()
    if main_process:
        plan = plan_output(out, config, resume=resume, overwrite=overwrite)
        if plan.complete is not None:  # a finished run: nothing to do, nothing changed
            log.info("the run in %s is complete (%s steps); train longer with a larger --max-steps", out,
                     plan.complete.get("steps"))
            return {**plan.complete, "already_complete": True}
    else:  # the main process checks and prepares the folder; the others only find the checkpoint
        ckpts = complete_checkpoints(out) if resume else []
        plan = Plan(resume=resume, checkpoint=ckpts[-1] if ckpts else None)
    checkpoint = plan.checkpoint
    train_convs = load_conversations(config.data, split="train", limit=config.data_limit, seed=config.seed)
    try:
        held_convs = load_conversations(config.data, split="heldout", limit=200, seed=0)  # same items for every seed
    except ValueError:
        held_convs = None  # a small file can hash every record into training
    if main_process:
        check_writable(out, kind="dir", flag="--output")
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)

    # What the model's config, its tokenizer and the data can refuse, before any weight loads.
    from .preflight import check_train, tokenize_datasets

    ready = check_train(config, train_convs, held_convs, tokenizer=tokenizer, model=model)
    set_seed(config.seed)
    method = config.training_method
    if model is None:  # straight onto the run's device: every phase below runs there
        model, tokenizer = load_model(method.base_source(config), dtype=method.master_dtype(config),
                                      trust_remote_code=config.trust_remote_code, device=device)
    elif model_device(model) != device:
        log.info("moving the given model to %s (TrainConfig.device %r)", device, config.device)
        model = model.to(device)
    log.info("training on %s (%s)", device, device_name(device))
    train_ds, held_ds = ready.train_ds, ready.held_ds
    if train_ds is None:  # no tokenizer could be had without the model: tokenized now
        train_ds, held_ds = tokenize_datasets(config, train_convs, held_convs, tokenizer)
    collator = ChatCollator(tokenizer)
    result: dict = {"method": config.method, "model": config.model, "data": config.data,
                    "device": describe_device(device)}
    base_fp = None  # the unchanged base is measured once per machine: evaluation/cache.py
    if config.eval_before:
        from .evaluation import cache

        if cache.enabled():
            cache.seed_from(os.environ.get("SALIENTFT_MEASURE_SEED"))
            base_fp = cache.model_fingerprint(model)
        result["heldout_loss_before"] = heldout_loss(model, held_ds, collator, fingerprint=base_fp)
    # measured now (on the unchanged base), written once the folder is this run's (start_run, below)
    before = (_measure_eval(model, tokenizer, config, fingerprint=base_fp)
              if config.eval_tasks and config.eval_before else None)
    eval_before = before[0] if before else None

    set_seed(config.seed)
    model = method.prepare(model, config, train_ds)
    if config.gradient_checkpointing:
        model.config.use_cache = False
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    counts = trainable_parameters(model)
    callbacks = method.callbacks(config)
    SalientTrainer, CompleteMarker = _trainer_classes()
    args = _training_arguments(
        device,
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
        lock, plan = start_run(out, config, plan)
        stack.callback(lock.release)
        checkpoint = plan.checkpoint
        if before:
            _write_evaluation(out, "eval_before", *before)
    received = stack.enter_context(_signals_to_flag())
    trainer.add_callback(_signal_callback(received))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if checkpoint is not None and 0 < config.max_steps <= _checkpoint_step(checkpoint):
        _restore_finished(trainer, checkpoint)  # killed during the final save: no step more than asked
    else:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    wall = time.perf_counter() - t0
    if received:
        step = trainer.state.global_step
        saved = out / f"checkpoint-{step}"
        name = "SIGINT" if received[0] == 2 else "SIGTERM" if received[0] == 15 else f"signal {received[0]}"
        where = (f"{saved.name} is saved" if (saved / COMPLETE_MARKER).is_file() else last_good(out))
        raise Interrupted(f"interrupted by {name} after step {step}: {where}; continue the run with --resume "
                          "(the same command and settings)", received[0])
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
        "peak_memory_bytes": _peak_memory_bytes(device),
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
        outputs.record(out, method.output, *(["merged"] if config.merge else []), "loss.png", "metrics.json")
        method.save_final(model, tokenizer, config, out)
        if history:
            _plot_loss(history, out / "loss.png", f"{config.method} on {config.model}")
        write_json(out / "metrics.json", result)  # last: marks the run finished
    except Exception as e:
        reason = outputs.write_failure(e)
        if reason is None:
            raise
        raise OutputWriteError(f"could not write the finished run into {out} ({reason}); "
                               f"{last_good(out)}. Free some space, then rerun with --resume") from e
    return result


def _checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was saved at (its trainer_state.json, else its name)."""
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(checkpoint.name.rsplit("-", 1)[1])


def _restore_finished(trainer, checkpoint: Path) -> None:
    """Load a checkpoint of the run's last step into the trainer without training: the Trainer
    would train one more step when resumed at ``max_steps`` (it skips the batches already seen and
    checks the total only after the next step)."""
    from transformers import TrainerState

    log.info("%s is the run's last step: writing the outputs without training", checkpoint)
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


def _signals_to_flag():
    """While the training runs: SIGINT and SIGTERM append their number to the yielded list instead
    of stopping the process (the StopOnSignal callback then saves and stops at the step boundary);
    a second signal stops at once. Outside the main thread (no signal handlers there) nothing changes."""
    import signal
    import threading
    from contextlib import contextmanager

    @contextmanager
    def handlers():
        received: list[int] = []
        if threading.current_thread() is not threading.main_thread():
            yield received
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum, frame):
            if received:  # a second signal: stop now (the checkpoints on disk stay intact)
                raise KeyboardInterrupt
            received.append(signum)
            log.warning("received %s: saving a checkpoint at the end of this step, then stopping "
                        "(send it again to stop at once)", signal.Signals(signum).name)

        for s in previous:
            signal.signal(s, on_signal)
        try:
            yield received
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    return handlers()


def _unsharded(trainer, config: TrainConfig, train_ds):
    """FSDP: the trained model as one unsharded model on rank 0 (None on the other ranks).

    A method that can (GIFT-SW: ``gather_trained``) gathers only what trained, on every rank;
    rank 0 loads the base again and attaches it, as a saved adapter is attached (no scores, no
    calibration, no base weight gathered). Otherwise the full state dict is gathered on rank 0,
    which loads the base, repeats the method's preparation with the run's seed and loads that
    state. Evaluation, the outputs and merges then work on full weights, never on shards (an
    in-place merge of a DTensor shard raises; a forward of a sharded model on rank 0 alone would
    wait for the other ranks forever).
    """
    from transformers import set_seed

    method = config.training_method
    trained = method.gather_trained(trainer.model)
    state = trainer.accelerator.get_state_dict(trainer.model) if trained is None else None
    if not trainer.is_world_process_zero():
        return None
    model, _ = load_model(method.base_source(config), dtype=method.master_dtype(config),
                          trust_remote_code=config.trust_remote_code, device=resolve_device(config.device))
    if trained is not None:
        return method.attach_trained(model, trained)
    set_seed(config.seed)
    model = method.prepare(model, config, train_ds)
    model.load_state_dict(state)
    return model


def _training_arguments(device: torch.device, **kwargs):
    """The Trainer's arguments for a run on ``device`` (``devices.resolve_device``).

    The CPU: ``use_cpu``, so the Trainer never moves the model to a GPU it sees. One process on
    a GPU: exactly that GPU (``cuda:N`` as asked), never the Trainer's own choice of cuda:0 with
    every other visible GPU under ``nn.DataParallel``; several processes (torchrun): the
    Trainer's ``cuda:<LOCAL_RANK>``, which ``resolve_device`` gives too."""
    return _run_arguments_class()(use_cpu=device.type == "cpu", salientft_device=str(device), **kwargs)


_RUN_ARGUMENTS = None


def _run_arguments_class():
    """``RunArguments``: TrainingArguments pinned to ``salientft_device``; built on first use (it
    imports transformers) and reachable as ``salientft.train.RunArguments``, so the Trainer's
    ``training_args.bin`` pickles and loads back."""
    global _RUN_ARGUMENTS
    if _RUN_ARGUMENTS is not None:
        return _RUN_ARGUMENTS
    from functools import cached_property

    from accelerate.utils import DistributedType
    from transformers import TrainingArguments

    @dataclasses.dataclass
    class RunArguments(TrainingArguments):
        salientft_device: str | None = dataclasses.field(
            default=None, metadata={"help": "the run's device (salientft.devices.resolve_device)"})

        @cached_property
        def _setup_devices(self):
            chosen = TrainingArguments._setup_devices.func(self)
            device = torch.device(self.salientft_device) if self.salientft_device else chosen
            if device.type != "cuda" or self.distributed_state.distributed_type != DistributedType.NO:
                return chosen
            torch.cuda.set_device(device)  # accelerate's "cuda" (where it places the model) is this one
            self._n_gpu = 1
            return device

    RunArguments.__module__, RunArguments.__qualname__ = __name__, "RunArguments"
    _RUN_ARGUMENTS = RunArguments
    return RunArguments


def __getattr__(name):
    if name == "RunArguments":
        return _run_arguments_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _evaluate(model, tokenizer, config: TrainConfig, out: Path, name: str, fingerprint: str | None = None) -> dict:
    """Evaluate, and write ``<name>.json`` and its per-item ``<name>.samples.jsonl`` into the run
    folder (each atomically, main process only), so that ``salientft compare`` pairs two runs item by item."""
    report, records = _measure_eval(model, tokenizer, config, fingerprint)
    if _is_main_process():
        _write_evaluation(out, name, report, records)
    return report


def _measure_eval(model, tokenizer, config: TrainConfig, fingerprint: str | None = None) -> tuple[dict, list]:
    """(report, per-item records) of the run's evaluation. ``fingerprint`` (of the model,
    ``evaluation.cache``): read them from the measure cache when the same model was evaluated the
    same way before (``"from_cache": true`` in the report)."""
    from .evaluation import evaluate
    from .evaluation.cli_api import sample_records

    def run():
        report = evaluate(model, tokenizer, config.eval_tasks, limit=config.eval_limit, subset=config.eval_subset,
                          return_items=True)
        records = sample_records(report)
        for res in report["results"].values():
            res.pop("items", None)
        return {"report": report, "records": records}

    if fingerprint is None:
        measured = run()
    else:
        from .evaluation import cache

        fields = {"model": fingerprint, "device": next(model.parameters()).device.type, "tasks": config.eval_tasks,
                  "limit": config.eval_limit, "subset": config.eval_subset, "code": cache.code_version("eval")}
        measured, hit = cache.cached("eval", fields, run)
        if hit:
            measured["report"]["from_cache"] = True
    return measured["report"], measured["records"]


def _write_evaluation(out: Path, name: str, report: dict, records: list) -> None:
    from .evaluation.cli_api import samples_path, write_samples

    outputs.record(out, f"{name}.json", samples_path(out / f"{name}.json").name)
    report["samples"] = write_samples(samples_path(out / f"{name}.json"), records).name
    write_json(out / f"{name}.json", report)


def load_run(run_dir: str | Path, dtype="bf16"):
    """(model, tokenizer) of a finished run: its full or merged model, or base + adapter."""
    from .evaluation.loading import load_for_eval

    model, tok, _ = load_for_eval(str(run_dir), dtype=dtype)
    return model, tok


__all__ = ["train", "prepare_model", "load_run", "complete_checkpoints", "RunStopped", "NonFiniteLossError",
           "OutputWriteError", "Interrupted", "heldout_loss", "plan_output", "start_run", "config_changes", "last_good",
           "RESUME_MAY_CHANGE", "RUN_CONFIG", "COMPLETE_MARKER"]


def resolve_train_config(config_file: str | None, flags: dict) -> TrainConfig:
    """The run's config: the YAML/JSON file's fields, overridden by the flags given."""
    values: dict = {}
    if config_file:
        import yaml

        from .config_base import YAMLTooLarge, load_yaml

        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"--config {config_file}: no such file")
        try:
            values = load_yaml(path.read_text(encoding="utf-8")) or {}
        except YAMLTooLarge as e:
            raise ValueError(f"--config {config_file} is refused: {e}; write the values out") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"--config {config_file} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ValueError(f"--config {config_file} must hold a mapping of TrainConfig fields")
    from_file = set(values) - set(flags)
    values.update(flags)
    try:
        return TrainConfig.from_dict(values)
    except ValueError as e:
        if config_file and (not set(values) <= {f.name for f in dataclasses.fields(TrainConfig)}
                            or getattr(e, "field", None) in from_file):
            raise ValueError(f"--config {config_file}: {e}") from None  # the file's unknown or mistyped fields
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
