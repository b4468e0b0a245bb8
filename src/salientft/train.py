"""One training loop for every method, built on the Hugging Face Trainer.

:func:`train` reads top to bottom as the run's phases, each a short function below it: plan the
output folder, load the data, load the base, measure it, prepare the method, build the trainer,
fit, collect the metrics, write the outputs. What differs between methods (the dtype of master
weights, how the model is made trainable, checkpoint contents, metrics, outputs) is asked of
``salientft.methods``; nothing here branches on a method's name. The run's add-on, GMT's
gradient mask (``config.mask``), brings its Trainer callback and its metrics. The Trainer
subclass, its arguments and the run's stops live in ``salientft.trainer``. Precision: ``dtype="bf16"`` keeps frozen weights in bf16,
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

import logging
import os
import resource
from contextlib import ExitStack
from pathlib import Path

import torch

from . import outputs
from ._io import atomic_path, check_writable, write_json
from .config import TrainConfig, resolve_train_config  # noqa: F401  (resolve_train_config re-exported)
from .devices import describe_device, device_name, model_device, resolve_device
from .gift import trainable_parameters
from .methods.addons import addons_of
from .models import load_model
from .runfolder import (COMPLETE_MARKER, RESUME_MAY_CHANGE, RUN_CONFIG, Plan, complete_checkpoints,  # noqa: F401
                        config_changes, last_good, plan_output, start_run)
from .trainer import (TEST_SIGNAL_ENV, Interrupted, NonFiniteLossError, OutputWriteError,  # noqa: F401  (re-exported)
                      RunStopped, _is_main_process, _training_arguments, build_trainer, check_launch, fit,
                      nonfinite_stop)

log = logging.getLogger(__name__)


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, model=None, tokenizer=None,
          callbacks=()) -> dict:
    """Fine-tune ``config.model`` on ``config.data`` with ``config.method``; returns the metrics.

    ``resume``: continue the run in ``config.output`` from its newest complete checkpoint (its
    settings must match, see :func:`config_changes`); a finished run is not trained again: its
    stored metrics are returned with ``already_complete`` set. ``overwrite``: replace the run there
    (see :func:`plan_output`). ``model``/``tokenizer``: an already loaded base (else loaded from the
    config); ``callbacks``: extra Hugging Face ``TrainerCallback`` objects, run after the run's own.

    The folder's lock is held from the start of the training to the end of the outputs. SIGINT and
    SIGTERM during the training save a checkpoint at the next step boundary and raise
    :class:`Interrupted`; a non-finite loss raises :class:`NonFiniteLossError`, after deleting the
    checkpoint whose weights gave it.
    """
    device = check_launch(config)
    out = Path(config.output)
    plan = _plan_output(config, out, resume=resume, overwrite=overwrite)
    if plan.complete is not None:  # a finished run: nothing to do, nothing changed
        return {**plan.complete, "already_complete": True}
    data = _load_data(config, out, model=model, tokenizer=tokenizer)
    with ExitStack() as stack:
        try:
            model, tokenizer = _load_base(config, device, model, tokenizer)
            data = _tokenized(config, data, tokenizer)
            result, before = _measure_before(config, model, tokenizer, data, device)
            model, counts = _prepare_method(config, model, data)
            trainer = build_trainer(config, model, data.train_ds, data.collator, device,
                                    callbacks=[*(c for a in addons_of(config) for c in a.callbacks()), *callbacks])
            checkpoint = _start(config, out, plan, before, stack)
            wall = fit(trainer, config, checkpoint, stack)
            model = _unsharded(trainer, config, data.train_ds) if trainer.is_fsdp_enabled else trainer.model
            if not trainer.is_world_process_zero():
                return result
            result.update(_run_metrics(config, trainer, counts, wall, device, checkpoint))
            result.update(_measure_after(config, model, tokenizer, data, out, before))
            _write_outputs(config, model, tokenizer, result, out)
            return result
        except NonFiniteLossError as e:
            raise NonFiniteLossError(nonfinite_stop(out, str(e))) from None


# ----------------------------------------------------------------------------- the phases


class _Data:
    """The run's data: the conversations, then the tokenized sets and their collator."""

    def __init__(self, train_convs, held_convs, ready):
        self.train_convs, self.held_convs = train_convs, held_convs
        self.train_ds, self.held_ds = ready.train_ds, ready.held_ds
        self.collator = None


def _plan_output(config: TrainConfig, out: Path, *, resume: bool, overwrite: bool) -> Plan:
    """What may happen in ``--output`` (the main process checks; the others only find the checkpoint)."""
    if not _is_main_process():
        ckpts = complete_checkpoints(out) if resume else []
        return Plan(resume=resume, checkpoint=ckpts[-1] if ckpts else None)
    plan = plan_output(out, config, resume=resume, overwrite=overwrite)
    if plan.complete is not None:
        log.info("the run in %s is complete (%s steps); train longer with a larger --max-steps", out,
                 plan.complete.get("steps"))
    return plan


def _load_data(config: TrainConfig, out: Path, *, model=None, tokenizer=None) -> _Data:
    """The conversations, and everything the model's config, its tokenizer and the data can refuse
    before any weight loads (``preflight.check_train``); a writable ``--output``."""
    from .data.instruct import load_conversations
    from .preflight import check_train

    train_convs = load_conversations(config.data, split="train", limit=config.data_limit, seed=config.seed)
    try:
        held_convs = load_conversations(config.data, split="heldout", limit=200, seed=0)  # same items for every seed
    except ValueError:
        held_convs = None  # a small file can hash every record into training
    if _is_main_process():
        check_writable(out, kind="dir", flag="--output")
    ready = check_train(config, train_convs, held_convs, tokenizer=tokenizer, model=model)
    return _Data(train_convs, held_convs, ready)


def _load_base(config: TrainConfig, device: torch.device, model=None, tokenizer=None):
    """(model, tokenizer) of the base, straight onto the run's device (every phase runs there), or where the
    method keeps it until the Trainer places it (``Method.base_device``: GIFT-SW's block-by-block calibration)."""
    from transformers import set_seed

    set_seed(config.seed)
    method = config.training_method
    if model is None:
        model, tokenizer = load_model(method.base_source(config), dtype=method.master_dtype(config),
                                      trust_remote_code=config.trust_remote_code,
                                      device=method.base_device(config, device))
    elif model_device(model) != device:
        log.info("moving the given model to %s (TrainConfig.device %r)", device, config.device)
        model = model.to(device)
    log.info("training on %s (%s)", device, device_name(device))
    return model, tokenizer


def _tokenized(config: TrainConfig, data: _Data, tokenizer) -> _Data:
    """``data`` with its tokenized sets (when no tokenizer could be had before the model) and collator."""
    from .data.chat import ChatCollator
    from .preflight import tokenize_datasets

    if data.train_ds is None:
        data.train_ds, data.held_ds = tokenize_datasets(config, data.train_convs, data.held_convs, tokenizer)
    data.collator = ChatCollator(tokenizer)
    return data


def _measure_before(config: TrainConfig, model, tokenizer, data: _Data, device: torch.device):
    """(the result so far, the evaluation before training or None), measured on the unchanged base;
    the evaluation is written once the folder is this run's (``_start``). The base is measured once
    per machine (evaluation/cache.py)."""
    result: dict = {"method": config.method, "model": config.model, "data": config.data,
                    "device": describe_device(device)}
    if not config.eval_before:
        return result, None
    from .evaluation import cache

    base_fp = None
    if cache.enabled():
        cache.seed_from(os.environ.get("SALIENTFT_MEASURE_SEED"))
        base_fp = cache.ModelFingerprint(model)  # read at most once, only when an entry is read or written
    result["heldout_loss_before"] = heldout_loss(model, data.held_ds, data.collator, fingerprint=base_fp)
    before = _measure_eval(model, tokenizer, config, fingerprint=base_fp) if config.eval_tasks else None
    return result, before


def _prepare_method(config: TrainConfig, model, data: _Data):
    """(the model made trainable the method's way, its parameter counts)."""
    from transformers import set_seed

    set_seed(config.seed)
    model = config.training_method.prepare(model, config, data.train_ds)
    if config.gradient_checkpointing:
        model.config.use_cache = False
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model, trainable_parameters(model)


def _start(config: TrainConfig, out: Path, plan: Plan, before, stack) -> Path | None:
    """Make the folder this run's (the lock, held in ``stack``; ``run_config.json``) on the main
    process, write the evaluation before training; returns the checkpoint to resume from."""
    if not _is_main_process():
        return plan.checkpoint
    lock, plan = start_run(out, config, plan)
    stack.callback(lock.release)
    if plan.checkpoint is not None:
        log.info("resuming from %s", plan.checkpoint)
    if before:
        _write_evaluation(out, "eval_before", *before)
    return plan.checkpoint


def _run_metrics(config: TrainConfig, trainer, counts: dict, wall: float, device, checkpoint) -> dict:
    """The training's own metrics: loss curve, sizes, speed, memory; the method's and the add-ons'."""
    log_history = trainer.state.log_history
    return {
        "train_loss": [{"step": h["step"], "loss": h["loss"]} for h in log_history if "loss" in h],
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
        **config.training_method.metrics(log_history),
        **{k: v for a in addons_of(config) for k, v in a.metrics(log_history).items()},
    }


def _measure_after(config: TrainConfig, model, tokenizer, data: _Data, out: Path, before) -> dict:
    """The held-out loss and the evaluation of the trained model (with the one before, when measured)."""
    result = {"heldout_loss_after": heldout_loss(model, data.held_ds, data.collator)}
    if config.eval_tasks:
        if before is not None:
            result["eval_before"] = before[0]
        result["eval_after"] = _evaluate(model, tokenizer, config, out, "eval_after")
    return result


def _write_outputs(config: TrainConfig, model, tokenizer, result: dict, out: Path) -> None:
    """The method's output (and merged/), the loss plot, and last ``metrics.json``, which marks the
    run finished. A storage failure is an OutputWriteError naming the last good checkpoint."""
    method = config.training_method
    merged = ["merged"] if getattr(config.method_config, "merge", False) and method.mergeable else []
    try:
        outputs.record(out, method.output, *merged, "loss.png", "metrics.json")
        method.save_final(model, tokenizer, config, out)
        if result["train_loss"]:
            _plot_loss(result["train_loss"], out / "loss.png", f"{config.method} on {config.model}")
        write_json(out / "metrics.json", result)  # last: marks the run finished
    except Exception as e:
        reason = outputs.write_failure(e)
        if reason is None:
            raise
        raise OutputWriteError(f"could not write the finished run into {out} ({reason}); "
                               f"{last_good(out)}. Free some space, then rerun with --resume") from e


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
    from .labelled_logits import labelled_logits, labelled_rows

    ds = Subset(dataset, range(min(limit, len(dataset))))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # summed on the model's device and read once at the end: no host sync per batch
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.no_grad():
        for batch in DataLoader(ds, batch_size=batch_size, collate_fn=collator):
            rows, targets = labelled_rows(batch["labels"])  # on the host: the collator's CPU tensors
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            logits = labelled_logits(model, rows.to(device), input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"])
            total += torch.nn.functional.cross_entropy(logits.float(), targets.to(device), reduction="sum")
            count += rows.numel()
    model.train(was_training)
    return float(total) / max(count, 1)


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


def __getattr__(name):
    if name == "RunArguments":  # the Trainer's training_args.bin of earlier runs names it here
        from .trainer import _run_arguments_class

        return _run_arguments_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
