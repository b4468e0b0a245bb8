"""salientft train: the run around the method (run folder, resume rules, evaluation, outputs, config
precedence, refusals). What every method must do is tests/test_methods_contract.py's battery."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from salientft import methods
from salientft.cli import main
from salientft.config import TrainConfig
from salientft.train import NonFiniteLossError, complete_checkpoints, resolve_train_config, train

from conftest import suite_device

ROOT = Path(__file__).resolve().parents[1]


def jsonl(path, n=24):
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def tiny_config(tmp_path, method, **kw):
    """A tiny run of ``method``: the shared settings it uses (a method refuses the others), then ``kw``."""
    base = dict(model="tiny-random-llama", data=jsonl(tmp_path / "d.jsonl"), output=str(tmp_path / method),
                method=method, max_steps=3, batch_size=4, max_length=64, dtype="fp32", lr=1e-3,
                metric="magnitude", n_salient=4, lora_r=2, calib_samples=8, warmup_ratio=0.0,
                device=str(suite_device()))  # the suite's device, never a GPU train() merely finds
    used = methods.get(method, quantized=kw.get("quantized") is not None).only_used(base)
    return TrainConfig(**{**used, **kw})


@pytest.mark.parametrize("before", [True, False])
def test_eval_before_can_be_skipped(tmp_path, before):
    cfg = tiny_config(tmp_path, "salient", data="embedded", data_limit=8, max_length=384, max_steps=1,
                      eval_tasks="boolq", eval_limit=2, eval_before=before)
    result = train(cfg)
    assert result["eval_after"]["results"]["boolq"]["n"] == 2 and result["heldout_loss_after"] > 0
    assert ("eval_before" in result) == before and ("heldout_loss_before" in result) == before


def test_runs_evaluated_on_a_subset_are_paired_by_compare(tmp_path, capsys):
    """train writes eval_before/after.json and their per-item samples; compare pairs two runs."""
    from salientft.cli import main
    from salientft.evaluation.tasks import get_subset

    runs = []
    for method in ("salient", "gift-sw"):
        (tmp_path / method).mkdir()
        cfg = tiny_config(tmp_path / method, method, data="embedded", data_limit=8, max_length=384, max_steps=1,
                          eval_tasks="boolq,piqa", eval_subset="smoke20")
        result = train(cfg)
        out = Path(cfg.output)
        for name in ("eval_before", "eval_after"):
            report = json.loads((out / f"{name}.json").read_text())
            assert report == result[name] and report["samples"] == f"{name}.samples.jsonl"
            assert report["subset"]["name"] == "smoke20"
            recs = [json.loads(line) for line in (out / f"{name}.samples.jsonl").read_text().splitlines()]
            for task in ("boolq", "piqa"):
                ids = [r["id"] for r in recs if r["task"] == task]
                assert ids == list(get_subset("smoke20").ids(task)) and report["results"][task]["n"] == len(ids)
                assert sum(r["acc"] for r in recs if r["task"] == task) / len(ids) == report["results"][task]["acc"]
        runs.append(out)
    capsys.readouterr()
    assert main(["compare", *map(str, runs), "--output", str(tmp_path / "cmp.json"), "--resamples", "200"]) == 0
    pairs = json.loads((tmp_path / "cmp.json").read_text())["pairs"]
    assert {(p["task"], p["metric"]) for p in pairs} >= {("boolq", "acc"), ("piqa", "acc_norm")}
    with pytest.raises(ValueError, match="exclusive"):
        tiny_config(tmp_path, "salient", eval_tasks="boolq", eval_subset="smoke20", eval_limit=3)
    with pytest.raises(ValueError, match="paper500"):
        tiny_config(tmp_path, "salient", eval_tasks="boolq", eval_subset="paper5000")


def _final_salient(out):
    from salientft.gift import read_adapter

    return read_adapter(Path(out) / "adapter")[1]


@pytest.mark.numerics
def test_resume_ends_with_the_same_weights(tmp_path):
    straight = tiny_config(tmp_path, "gift-sw", max_steps=4, save_steps=2, output=str(tmp_path / "a"))
    train(straight)
    interrupted = tiny_config(tmp_path, "gift-sw", max_steps=4, save_steps=2, output=str(tmp_path / "b"))
    train(interrupted)
    # Simulate a crash after step 2: the later checkpoint and the final outputs are gone,
    # and a half-written checkpoint (no completion marker) is left behind.
    import shutil

    for p in ("checkpoint-4", "adapter", "metrics.json"):
        target = tmp_path / "b" / p
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    (tmp_path / "b" / "checkpoint-3").mkdir()
    from salientft.outputs import record

    record(tmp_path / "b", "checkpoint-3")  # a checkpoint's name is recorded before it is written
    assert [p.name for p in complete_checkpoints(tmp_path / "b")] == ["checkpoint-2"]
    result = train(interrupted, resume=True)
    assert result["resumed_from"].endswith("checkpoint-2")
    # Resuming repeats the very same computation (same process, shapes, kernels, threads, RNG state),
    # so weights and losses are bit-identical on any machine; a tolerance (or rounding the losses to
    # 4 decimals, which can still split two values 1e-9 apart) would only hide a resume bug.
    a, b = _final_salient(tmp_path / "a"), _final_salient(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = json.loads((tmp_path / "a" / "metrics.json").read_text())["train_loss"]
    lb = json.loads((tmp_path / "b" / "metrics.json").read_text())["train_loss"]
    assert [x["loss"] for x in la[2:]] == [x["loss"] for x in lb if x["step"] > 2]


def test_one_output_folder_holds_one_run(tmp_path):
    """A second run into the folder of another is refused; --overwrite replaces it, and only when
    everything there is salientft's (its manifest lists it); a folder of the user's is refused."""
    out = tmp_path / "run"
    train(tiny_config(tmp_path, "full", max_steps=2, save_steps=1, output=str(out)))
    assert (out / "model").is_dir() and len(complete_checkpoints(out)) == 2
    second = tiny_config(tmp_path, "gift-sw", max_steps=1, save_steps=1, output=str(out))
    with pytest.raises(FileExistsError, match="already holds a run .* --resume, .* --overwrite"):
        train(second)
    with pytest.raises(ValueError, match="settings differ .* method: 'full' -> 'gift-sw'"):
        train(second, resume=True)
    with pytest.raises(ValueError, match="give one of them"):
        train(second, resume=True, overwrite=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"salientft did not write \(notes.txt\)"):
        train(second, overwrite=True)
    assert (out / "model").is_dir()  # nothing was deleted
    (out / "notes.txt").unlink()
    train(second, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        ".salientft-manifest.json", ".salientft.lock", "adapter", "checkpoint-1", "loss.png", "metrics.json",
        "run_config.json", "run_history.json"]
    assert json.loads((out / "run_config.json").read_text())["method"] == "gift-sw"

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files salientft did not write \(notes.txt\)"):
        train(tiny_config(tmp_path, "salient", max_steps=1, output=str(mine)))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_run_config_is_written_when_training_starts(tmp_path):
    from transformers import TrainerCallback

    cfg = tiny_config(tmp_path, "salient", max_steps=1)
    seen = {}

    class Look(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            out = Path(cfg.output)
            seen["config"] = json.loads((out / "run_config.json").read_text())
            seen["finished"] = (out / "metrics.json").exists()

    train(cfg, callbacks=[Look()])
    assert seen == {"config": cfg.to_dict(), "finished": False}
    record = json.loads((Path(cfg.output) / "run_history.json").read_text())  # the run's record beside its config
    assert record["data_sha256"] == hashlib.sha256(Path(cfg.data).read_bytes()).hexdigest()
    assert [h["event"] for h in record["history"]] == ["started"]


def test_resume_compares_the_settings():
    from salientft.train import config_changes

    stored = TrainConfig(method="gift-sw", max_steps=10, eval_tasks="paper").to_dict()
    same = TrainConfig(method="gift-sw", max_steps=10, lr=1e-4)  # the method's default, spelled out
    assert config_changes(stored, same) == []
    longer = TrainConfig(method="gift-sw", max_steps=20, eval_tasks="", eval_before=False, output="elsewhere")
    assert config_changes(stored, longer) == []  # a longer run; the evaluation around it
    other = TrainConfig(method="gift-sw", max_steps=5, lr=1e-3, seed=1, packing=True)
    assert config_changes(stored, other) == [
        "lr: 0.0001 -> 0.001", "max_steps: 10 -> 5", "packing: False -> True", "seed: 0 -> 1"]
    assert config_changes({**stored, "max_steps": -1}, longer) == ["max_steps: -1 -> 20"]  # epochs -> steps
    assert config_changes({**stored, "future_field": 1}, same) == ["future_field: 1 -> '(absent)'"]
    # a run stored before a field existed ran with that field's default: resuming it is no change
    older = {k: v for k, v in stored.items() if k not in ("fsdp", "report_to")}
    assert config_changes(older, same) == []
    assert config_changes(older, TrainConfig(method="gift-sw", max_steps=10, report_to="tensorboard")) == []
    assert config_changes(older, TrainConfig(method="gift-sw", max_steps=10, fsdp="full_shard")) == [
        "fsdp: '' -> 'full_shard'"]


def test_run_configs_stored_with_the_former_fp32_salient_default_still_load_and_resume():
    """fp32_salient's default became GiftConfig's True (it was False, "always on with bf16"): a
    stored run_config.json or YAML with false still loads for every method and resumes unchanged."""
    from salientft.train import config_changes

    for method in ("lora", "full", "gift-sw"):
        old = {**TrainConfig(method=method).to_dict(), "fp32_salient": False}
        TrainConfig.from_dict(old)  # not refused as "method lora does not use --fp32-salient"
        assert config_changes(old, TrainConfig(method=method)) == []
    assert TrainConfig().fp32_salient is True
    with pytest.raises(ValueError, match="does not use --n-salient"):  # the rule itself still holds
        TrainConfig(method="lora", n_salient=4)


def test_an_adapter_on_another_base_is_refused_unless_asked(tmp_path):
    from salientft.cli import _build_parser
    from salientft.evaluation.loading import attach_adapter
    from salientft.models import tiny_random_llama

    cfg = tiny_config(tmp_path, "salient", max_steps=1)
    train(cfg)
    adapter = Path(cfg.output) / "adapter"
    with pytest.raises(ValueError, match="fingerprint mismatch.*salientft eval --no-check-base"):
        attach_adapter(tiny_random_llama(seed=1), adapter)
    forced = attach_adapter(tiny_random_llama(seed=1), adapter, check_base=False)
    assert any(n.endswith("salient_weight") for n, _ in forced.named_parameters())
    assert _build_parser().parse_args(["eval", "--model", "m", "--no-check-base"]).no_check_base is True


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(tiny_config(tmp_path, "gift-sw"), resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from salientft.models import load_model

    model, tok = load_model("tiny-random-llama", dtype="fp32")
    calls = {"n": 0}

    def poison(module, args, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] > 2:
                return output * float("nan")
        return output

    model.lm_head.register_forward_hook(poison)
    cfg = tiny_config(tmp_path, "full", max_steps=5, save_steps=1)
    # the loss of step 3 is computed with checkpoint-2's weights: resuming from it would give the same
    # loss again whatever the learning rate, so it is deleted and checkpoint-1 is the last good one
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 3 \(checkpoint-2, whose weights gave it, "
                                                 r"was deleted\); the last good checkpoint is .*checkpoint-1\. "
                                                 r"Continue from it with a lower learning rate \(--resume --lr"):
        train(cfg, model=model, tokenizer=tok)
    assert [p.name for p in complete_checkpoints(cfg.output)] == ["checkpoint-1"]
    assert not (Path(cfg.output) / "checkpoint-2").exists()


def test_config_file_and_flag_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("method: salient\nlr: 0.5\nbatch_size: 2\nmetric: random\n")
    cfg = resolve_train_config(str(cfg_file), {"lr": 0.1})
    assert (cfg.method, cfg.lr, cfg.batch_size, cfg.metric) == ("salient", 0.1, 2, "random")
    (tmp_path / "bad.yaml").write_text("bogus_field: 1\n")
    with pytest.raises(ValueError, match="unknown field.*bogus_field"):
        resolve_train_config(str(tmp_path / "bad.yaml"), {})
    assert TrainConfig(method="gift-sw").learning_rate == 1e-4
    assert TrainConfig(method="lora").learning_rate == 3e-5


def test_cli_end_to_end_and_bad_inputs(tmp_path, capsys):
    data = jsonl(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    rc = main(["train", "--model", "tiny-random-llama", "--data", data, "--output", str(out), "--method", "salient",
               "--metric", "random", "--n-salient", "3", "--max-steps", "2", "--dtype", "fp32", "--max-length", "64"])
    assert rc == 0
    assert "held-out loss" in capsys.readouterr().out
    assert json.loads((out / "run_config.json").read_text())["method_config"]["n_salient"] == 3  # the method's settings, nested

    def err(args):
        rc = main(["train", "--model", "tiny-random-llama", "--max-steps", "1", *args])
        assert rc == 2
        return capsys.readouterr().err

    assert "unknown method 'qlora'; choose from" in err(["--method", "qlora", "--output", str(tmp_path / "x")])
    assert "missing.jsonl" in err(["--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "x")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    assert "bad.jsonl:2" in err(["--data", str(bad), "--output", str(tmp_path / "x")])
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is a file" in err(["--data", data, "--output", str(afile)])


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.cpu_only("processes on the CPU with gloo")
def test_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) and the same global batch gives the same weights."""
    data = jsonl(tmp_path / "d.jsonl", n=32)
    common = ["train", "--model", "tiny-random-llama", "--data", data, "--method", "salient", "--metric", "magnitude",
              "--n-salient", "4", "--max-steps", "3", "--dtype", "fp32", "--max-length", "64", "--lr", "1e-3",
              "--packing", "--warmup-ratio", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    one = subprocess.run([sys.executable, "-m", "salientft.cli", *common, "--batch-size", "4",
                          "--output", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                          "-m", "salientft.cli", *common, "--batch-size", "2", "--output", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _final_salient(tmp_path / "one"), _final_salient(tmp_path / "two")
    from salientft.models import tiny_random_llama

    base = tiny_random_llama(seed=0)
    moved = 0.0
    # Two different computations: gloo sums two half-batch gradients, one process sums the whole
    # batch, so gradients differ by float reduction order (~1e-7 relative); after 3 AdamW steps the
    # weights differ by ~1e-8 (1e-3 of this tolerance, with every CPU kernel set and thread count
    # tried, docs/testing.md), while training moved them by > 1e-3 (asserted below).
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
        if k.endswith("salient_weight"):
            name = k[: -len(".salient_weight")]
            init = base.get_submodule(name).weight[:, a[f"{name}.salient_idx"]]
            moved = max(moved, float((a[k] - init).abs().max()))
    assert moved > 1e-3  # training really moved the columns, so equality is not trivial


def test_quantized_recovery_needs_a_supported_method(tmp_path):
    with pytest.raises(ValueError, match="--quantized recovers with one of"):
        tiny_config(tmp_path, "full", quantized=str(tmp_path))
    with pytest.raises(ValueError, match="give --quantized DIR"):
        tiny_config(tmp_path, "ste")


def test_report_to_tensorboard_writes_event_files_offline(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = tiny_config(tmp_path, "salient", max_steps=2, report_to="tensorboard")
    train(cfg)
    events = list((Path(cfg.output) / "runs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert any("loss" in tag for tag in acc.Tags()["scalars"])
    assert TrainConfig(report_to="tensorboard,wandb").report_to == "tensorboard,wandb"
    with pytest.raises(ValueError, match="report_to"):
        TrainConfig(report_to="")
