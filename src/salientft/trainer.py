"""The Hugging Face Trainer as a salientft run drives it: the Trainer subclass and its callbacks,
the training arguments (device pinning, FSDP2, trackers), the run's stops (a non-finite loss, a
checkpoint that cannot be written, SIGINT/SIGTERM) and the distributed preflight.

``salientft.train`` reads as the run's phases and calls into here; nothing here knows a method
by name: what a checkpoint holds is asked of the method (``Method.save_checkpoint`` /
``load_checkpoint``). transformers is imported only when a Trainer is built.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path

import torch

from . import labelled_logits, outputs
from ._io import atomic_path
from .config import TrainConfig
from .runfolder import COMPLETE_MARKER, RUN_CONFIG, complete_checkpoints, discard_checkpoint, last_good

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


class CompleteMarkerMixin:
    """Mark a checkpoint complete once everything in it has been written (a TrainerCallback:
    ``trainer_classes``)."""

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

class SalientTrainerMixin:
    """What salientft adds to the Trainer (``trainer_classes`` puts it before ``Trainer``): stop on a
    non-finite loss, count tokens, follow a lowered ``--lr`` on resume, and let the method write and
    restore the model's part of a checkpoint (GIFT-SW: its compact adapter)."""

    def __init__(self, *a, method, **kw):
        super().__init__(*a, **kw)
        self.salientft_method = method
        self.session_tokens = 0  # this process's tokens since train() started
        self._labelled_only = None  # the LM head on the labelled rows: untried, then whether it fits

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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The LM head runs on the labelled positions only (labelled_logits.py): same loss, less
        # work and memory.
        inputs = dict(inputs)
        carried = inputs.pop(labelled_logits.ROWS_KEY, None)
        head = None
        if (self._labelled_only is not False and not return_outputs
                and torch.is_tensor(inputs.get("labels")) and "shift_labels" not in inputs
                and self.label_smoother is None and self.compute_loss_func is None and self.model_accepts_loss_kwargs):
            head = labelled_logits.output_layer(self.accelerator.unwrap_model(model))
        if head is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        rows, targets = labelled_logits.rows_for(labels, carried)
        first = self._labelled_only is None
        random_state = _random_state() if first else None  # a retried step draws the noise it would have
        try:
            with labelled_logits.head_on_rows(head, rows, labels.numel()):
                loss = super().compute_loss(model, {**inputs, "shift_labels": targets}, False, num_items_in_batch)
        except Exception as e:
            if not first:  # it fitted before: a real error
                raise
            _set_random_state(random_state)
            self._labelled_only = False
            log.warning("computing the LM head on the labelled positions only does not fit this model (%s: %s); "
                        "the run computes every position's logits", type(e).__name__, e)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._labelled_only = True
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
        from .methods.sharding import own_fsdp_checkpoint

        self.salientft_own_checkpoint = own_fsdp_checkpoint(self, output_dir, _internal_call)
        if not self.salientft_own_checkpoint:
            super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir):
        from .methods.sharding import without_fsdp_model_file

        with without_fsdp_model_file(getattr(self, "salientft_own_checkpoint", False)):
            super()._save_optimizer_and_scheduler(output_dir)

    def _save(self, output_dir=None, state_dict=None):
        directory = Path(output_dir or self.args.output_dir)
        if not self.salientft_method.save_checkpoint(self.model, directory):
            super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.salientft_method.load_checkpoint(self.model, Path(resume_from_checkpoint)):
            super()._load_from_checkpoint(resume_from_checkpoint, model)


def _random_state() -> tuple:
    """torch's CPU and CUDA generators' states (host-side reads: no device sync)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _set_random_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


_CLASSES: tuple | None = None


def trainer_classes():
    """(SalientTrainer, CompleteMarker): the mixins above on transformers' Trainer and
    TrainerCallback, built once, on first use (importing transformers is slow)."""
    global _CLASSES
    if _CLASSES is None:
        from transformers import Trainer, TrainerCallback

        class SalientTrainer(SalientTrainerMixin, Trainer):
            pass

        class CompleteMarker(CompleteMarkerMixin, TrainerCallback):
            pass

        _CLASSES = SalientTrainer, CompleteMarker
    return _CLASSES


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

def nonfinite_stop(out: Path, message: str) -> str:
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


def check_launch(config: TrainConfig) -> torch.device:
    """The run's device, after refusing a launch that cannot work (before any work): ``--fsdp``
    without several processes, a misspelled or absent device, FSDP's CPU-RAM-efficient loading."""
    from .devices import resolve_device

    if config.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError(f"--fsdp {config.fsdp} shards across processes: launch with torchrun --nproc_per_node N "
                         "or accelerate launch (see docs/distributed.md)")
    device = resolve_device(config.device)  # misspelled or absent: refused before any work
    if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() in ("1", "true", "yes"):
        raise ValueError("fsdp_cpu_ram_efficient_loading is on: the ranks other than 0 would get a model on the meta "
                         "device, but every rank prepares the method (salient columns, noise scale, their "
                         "persistent buffers) from real weights. Set fsdp_cpu_ram_efficient_loading: false "
                         "(see docs/distributed.md)")
    return device


def build_trainer(config: TrainConfig, model, train_ds, collator, device: torch.device, callbacks=()):
    """The run's SalientTrainer: the Trainer's arguments from ``config``, the completion marker,
    then ``callbacks`` (the run's add-ons', the caller's). Refuses an FSDP request the Trainer did
    not turn on (it would silently be DDP)."""
    SalientTrainer, CompleteMarker = trainer_classes()
    args = _training_arguments(
        device,
        output_dir=config.output,
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
    trainer = SalientTrainer(model=model, args=args, train_dataset=train_ds,
                             data_collator=labelled_logits.WithLabelledRows(collator),
                             callbacks=[CompleteMarker(), *callbacks], method=config.training_method)
    fsdp_asked = config.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"  # accelerate config
    if fsdp_asked and not trainer.is_fsdp_enabled:
        raise ValueError(
            f"FSDP (--fsdp {config.fsdp or '<accelerate config>'}): the Trainer did not turn it on. It needs several processes "
            "(torchrun / accelerate launch) on accelerators: accelerate runs FSDP on GPUs (and other "
            "accelerators), not on CPU processes, where it would silently be DDP. For DDP drop --fsdp (or use "
            "configs/accelerate/ddp_cpu.yaml); see docs/distributed.md"
        )
    return trainer


def fit(trainer, config: TrainConfig, checkpoint: Path | None, stack) -> float:
    """Train (from ``checkpoint`` when resuming); returns the wall time in seconds. SIGINT/SIGTERM
    save a checkpoint at the step boundary and raise :class:`Interrupted` (handlers held in ``stack``)."""
    received = stack.enter_context(_signals_to_flag())
    trainer.add_callback(_signal_callback(received))
    device = trainer.args.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if checkpoint is not None and 0 < config.max_steps <= _checkpoint_step(checkpoint):
        _restore_finished(trainer, checkpoint)  # killed during the final save: no step more than asked
    else:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    wall = time.perf_counter() - t0
    if received:
        out, step = Path(config.output), trainer.state.global_step
        saved = out / f"checkpoint-{step}"
        name = "SIGINT" if received[0] == 2 else "SIGTERM" if received[0] == 15 else f"signal {received[0]}"
        where = (f"{saved.name} is saved" if (saved / COMPLETE_MARKER).is_file() else last_good(out))
        raise Interrupted(f"interrupted by {name} after step {step}: {where}; continue the run with --resume "
                          "(the same command and settings)", received[0])
    return wall
