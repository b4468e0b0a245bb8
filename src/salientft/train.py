"""One training loop for every method, built on the Hugging Face Trainer.

What differs between methods (the dtype of master weights, how the model is made trainable,
callbacks, checkpoint contents, outputs) is asked of ``salientft.methods``; nothing here
branches on a method's name. Precision: ``dtype="bf16"`` keeps frozen weights in bf16,
trainable weights in fp32 and computes under bf16 autocast (dense methods keep fp32 master
weights); ``fp32`` is plain fp32.

Outputs in ``config.output``: the method's ``adapter/`` or ``model/``, ``merged/`` with
``merge=True``, ``metrics.json``, ``loss.png``, ``run_config.json`` (the resolved config) and
``checkpoint-<step>/`` every ``save_steps``. A checkpoint counts only
once its ``salientft_complete`` marker is written, so an interrupted save is never resumed from.
"""
from __future__ import annotations

import logging
import math
import re
import resource
import time
from pathlib import Path

import torch

from ._io import atomic_path, write_json
from .config import TrainConfig
from .gift import trainable_parameters
from .models import load_model

log = logging.getLogger(__name__)

COMPLETE_MARKER = "salientft_complete"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------- checkpoints


def complete_checkpoints(output: str | Path) -> list[Path]:
    """Checkpoint folders of a run that finished saving, oldest first."""
    out = Path(output)
    found = []
    for p in out.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / COMPLETE_MARKER).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


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
            self.tokens_seen = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            if "attention_mask" in inputs:
                self.tokens_seen += int(inputs["attention_mask"].sum())
            else:
                self.tokens_seen += int(inputs["input_ids"].numel())
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():
                last = complete_checkpoints(self.args.output_dir)
                keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
                raise NonFiniteLossError(
                    f"the training loss became {loss.item()} at step {self.state.global_step + 1}; "
                    f"{keep}. Lower the learning rate (--lr) or use --dtype fp32"
                )
            return loss

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


def _check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output {out} is a file; give a directory path")


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


def _plot_loss(history: list[dict], path: Path, title: str) -> None:
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


def train(config: TrainConfig, *, resume: bool = False, model=None, tokenizer=None, callbacks=()) -> dict:
    """Fine-tune ``config.model`` on ``config.data`` with ``config.method``; returns the metrics.

    ``model``/``tokenizer``: an already loaded base (else loaded from the config); ``callbacks``:
    extra Hugging Face ``TrainerCallback`` objects, run after the method's own.
    """
    extra_callbacks = list(callbacks)
    from transformers import TrainingArguments, set_seed

    from .data.chat import ChatCollator, build_dataset

    out = Path(config.output)
    _check_output(out)
    checkpoint = None
    if resume:
        ckpts = complete_checkpoints(out)
        if not ckpts:
            raise FileNotFoundError(f"--resume: no complete checkpoint-<step> folder in {out}")
        checkpoint = ckpts[-1]
        log.info("resuming from %s", checkpoint)
    set_seed(config.seed)
    method = config.training_method
    if model is None:
        model, tokenizer = load_model(method.base_source(config), dtype=method.master_dtype(config),
                                      trust_remote_code=config.trust_remote_code)
    train_ds = build_dataset(
        config.data, tokenizer, max_length=config.max_length, packing=config.packing, split="train",
        limit=config.data_limit, seed=config.seed,
    )
    try:
        held_ds = build_dataset(config.data, tokenizer, max_length=config.max_length, packing=False,
                                split="heldout", limit=200, seed=0)  # same items for every seed: comparable
    except (ValueError, KeyError):
        held_ds = None
    collator = ChatCollator(tokenizer)
    result: dict = {"method": config.method, "model": config.model, "data": config.data}
    if config.eval_before:
        result["heldout_loss_before"] = heldout_loss(model, held_ds, collator)
    eval_before = _evaluate(model, tokenizer, config) if config.eval_tasks and config.eval_before else None

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
        report_to="none",
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
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    wall = time.perf_counter() - t0
    model = trainer.model
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
        "tokens_seen": trainer.tokens_seen,
        "tokens_per_s": trainer.tokens_seen / wall if wall > 0 else None,
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
        result["eval_after"] = _evaluate(model, tokenizer, config)
    method.save_final(model, tokenizer, config, out)
    write_json(out / "run_config.json", config.to_dict())
    write_json(out / "metrics.json", result)
    if history:
        _plot_loss(history, out / "loss.png", f"{config.method} on {config.model}")
    return result


def _evaluate(model, tokenizer, config: TrainConfig) -> dict:
    from .evaluation import evaluate

    return evaluate(model, tokenizer, config.eval_tasks, limit=config.eval_limit)


def load_run(run_dir: str | Path, dtype="bf16"):
    """(model, tokenizer) of a finished run: its full or merged model, or base + adapter."""
    from .evaluation.loading import load_for_eval

    model, tok, _ = load_for_eval(str(run_dir), dtype=dtype)
    return model, tok


__all__ = ["train", "prepare_model", "load_run", "complete_checkpoints", "NonFiniteLossError", "heldout_loss"]


def resolve_train_config(config_file: str | None, flags: dict) -> TrainConfig:
    """The run's config: the YAML/JSON file's fields, overridden by the flags given."""
    values: dict = {}
    if config_file:
        import yaml

        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"--config {config_file}: no such file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"--config {config_file} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ValueError(f"--config {config_file} must hold a mapping of TrainConfig fields")
    values.update(flags)
    return TrainConfig.from_dict(values)


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
