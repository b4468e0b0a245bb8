"""Sharded training (FSDP2's ``fully_shard``) on 2 CPU processes (gloo) against one process.

See docs/distributed.md. Each test starts 2 workers (``torch.multiprocessing``, start method spawn:
a child forked from a pytest process whose earlier tests started threads can inherit a lock one of
them held and hang on it) and compares with a single-process computation on the full tensors.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import nn

from salientft.gmt import GradientMask

WORLD = 2

pytestmark = pytest.mark.cpu_only("processes on the CPU with gloo")


def _run(worker, *args):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(worker, args=(WORLD, os.path.join(d, "init"), d, *args), nprocs=WORLD, join=True,
                           start_method="spawn")
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def _init(rank, world, init_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _tiny_blocks(seed: int = 0) -> nn.Module:
    # odd row counts: the 2 shards of dim 0 are uneven (FSDP2 pads internally, to_local() is not)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 21), nn.Tanh(), nn.Linear(21, 8))


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    return fully_shard(model)


def _tie(g: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Few distinct values (and zeros): ties at the threshold span both shards (scaled by the
    full gradient's max, so a shard and the full tensor round alike)."""
    return (g * 4 / full.abs().max()).round() / 4


# -- GMT: the distributed exact selection ------------------------------------------------------


def _gmt_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    _init(rank, world, init_file)
    model = _shard(_tiny_blocks())
    torch.manual_seed(100 + rank)  # different data per rank: the reduce-scatter makes the gradient
    model(torch.randn(6, 16)).pow(2).mean().backward()
    grads = {n: p.grad.to_local().clone() for n, p in model.named_parameters()}
    out = {"full": {n: p.grad.full_tensor() for n, p in model.named_parameters()}}
    for case in ("plain", "ties"):
        for gran in ("tensor", "global"):
            for n, p in model.named_parameters():
                p.grad.to_local().copy_(_tie(grads[n], out["full"][n]) if case == "ties" else grads[n])
            stats = GradientMask(model, ratio=0.6, granularity=gran).apply_()
            out[f"{case}/{gran}"] = {
                "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters()},
                "kept": torch.tensor(stats["kept"]), "ranks": torch.tensor(stats["ranks"]),
                "kept_per": torch.tensor([stats["kept_per_tensor"][n] for n, _ in model.named_parameters()]),
            }
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_gmt_sharded_selection_equals_one_process():
    """fully_shard on 2 ranks: the kept sets are bit-identical to GradientMask on the full gradients,
    for per-tensor and global thresholds, with and without many ties at the threshold."""
    r0, r1 = _run(_gmt_worker)
    full = r0["full"]
    assert all(torch.equal(full[n], r1["full"][n]) for n in full)
    for case in ("plain", "ties"):
        for gran in ("tensor", "global"):
            ref = _tiny_blocks()
            names = [n for n, _ in ref.named_parameters()]
            for n, p in ref.named_parameters():
                p.grad = _tie(full[n], full[n]) if case == "ties" else full[n].clone()
            stats = GradientMask(ref, ratio=0.6, granularity=gran).apply_()
            a, b = r0[f"{case}/{gran}"], r1[f"{case}/{gran}"]
            assert int(a["ranks"]) == WORLD  # the distributed path ran
            for n, p in ref.named_parameters():
                assert torch.equal(a["grads"][n], p.grad), (case, gran, n)  # same kept set, same values
                assert torch.equal(b["grads"][n], p.grad), (case, gran, n)
            assert int(a["kept"]) == int(b["kept"]) == stats["kept"]
            assert a["kept_per"].tolist() == [stats["kept_per_tensor"][n] for n in names]
            if case == "ties":  # the tie-break really decided something
                t = stats["threshold"]
                ties = sum(int((p.grad.abs() == (t if gran == "global" else t[n])).sum())
                           for n, p in ref.named_parameters())
                allties = sum(int((_tie(full[n], full[n]).abs() == (t if gran == "global" else t[n])).sum())
                              for n in names)
                assert 0 < ties < allties


def _gmt_train_worker(rank, world, init_file, out_dir):
    """3 AdamW steps with a strict mask, sharded and (in the same process) unsharded on the global batch."""
    import torch.distributed as dist

    _init(rank, world, init_file)
    out = {}
    for gran in ("tensor", "global"):
        sharded, ref = _shard(_tiny_blocks()), _tiny_blocks()
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (sharded, ref)]
        masks = [GradientMask(m, ratio=0.6, granularity=gran, mode="strict") for m in (sharded, ref)]
        frozen_ok = True
        for step in range(3):
            torch.manual_seed(step)
            x = torch.randn(WORLD * 4, 16)
            sharded(x[rank * 4:(rank + 1) * 4]).pow(2).mean().backward()
            ref(x).pow(2).mean().backward()
            for mask, opt in zip(masks, opts):
                mask.apply_()
            before = {n: p.to_local().clone() for n, p in sharded.named_parameters()}
            zero = {n: p.grad.to_local() == 0 for n, p in sharded.named_parameters()}
            for mask, opt, m in zip(masks, opts, (sharded, ref)):
                mask.step(opt)
                opt.zero_grad()
            for n, p in sharded.named_parameters():  # masked entries of this shard did not move
                frozen_ok &= torch.equal(p.to_local()[zero[n]], before[n][zero[n]])
        out[gran] = {
            "sharded": {n: p.full_tensor() for n, p in sharded.named_parameters()},
            "ref": {n: p.detach().clone() for n, p in ref.named_parameters()},
            "frozen_ok": torch.tensor(frozen_ok),
        }
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_gmt_strict_sharded_training_equals_one_process():
    """Strict GMT with AdamW under fully_shard (2 ranks, 4 rows each) ends where one process on the
    8-row global batch ends; masked entries of every shard are left bit-identical by each step.

    Tolerance: the two runs differ only in the gradient's reduction order (the reduce-scatter's
    average of two half-batch means vs one mean over 8 rows), a few fp32 ulps, which AdamW's
    elementwise update carries over 3 steps to ~1e-6 relative; the kept sets are the same
    (a flip at the threshold would show as a 1e-2 difference, the learning rate)."""
    for r in _run(_gmt_train_worker):
        for gran in ("tensor", "global"):
            res = r[gran]
            assert bool(res["frozen_ok"])
            moved = 0.0
            init = {n: p.detach() for n, p in _tiny_blocks().named_parameters()}
            for n, w in res["ref"].items():
                torch.testing.assert_close(res["sharded"][n], w, rtol=1e-5, atol=1e-6)
                moved = max(moved, float((w - init[n]).abs().max()))
            assert moved > 1e-3


# -- GIFT-SW under fully_shard ------------------------------------------------------------------


def _gift_model(noise: str):
    from salientft.gift import GiftConfig, apply_gift
    from salientft.models import tiny_random_llama

    model = tiny_random_llama(seed=0, hidden_size=32, intermediate_size=48, vocab_size=96).train()
    return apply_gift(model, GiftConfig(n_salient=4, noise=noise, metric="magnitude", noise_bits=4))


def _gift_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import salientft.gift.layer as layer_mod
    from salientft import methods
    from salientft.gift import gift_layers
    from salientft.methods.sharding import gathered

    _init(rank, world, init_file)
    seen = []
    plain = layer_mod.salient_linear

    def spy(x, weight, *a, **kw):  # what the autograd function receives under FSDP2
        seen.append((type(weight) is torch.Tensor or type(weight) is nn.Parameter, tuple(weight.shape)))
        return plain(x, weight, *a, **kw)

    layer_mod.salient_linear = spy
    sharded, ref = _gift_model("weight"), _gift_model("weight")
    for block in sharded.model.layers:
        fully_shard(block)
    fully_shard(sharded)
    shapes = {n: tuple(m.base_weight().shape) for n, m in gift_layers(ref).items()}
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (sharded, ref)]
    gen = torch.Generator().manual_seed(7)
    for step in range(2):
        ids = torch.randint(3, 96, (WORLD * 2, 12), generator=gen)
        # the same global RNG state on every rank (as the Trainer's set_seed gives): the noise seeds
        # drawn in forward are identical, so both ranks perturb W alike, as one process would
        torch.manual_seed(1000 + step)
        mine = ids[rank * 2:(rank + 1) * 2]
        sharded(input_ids=mine, labels=mine).loss.backward()
        torch.manual_seed(1000 + step)
        ref(input_ids=ids, labels=ids).loss.backward()
        for o in opts:
            o.step()
            o.zero_grad()
    layer_mod.salient_linear = plain
    out = {"seen_plain": torch.tensor(all(ok for ok, _ in seen)),
           "seen_full": torch.tensor(sorted({s for _, s in seen}) == sorted(set(shapes.values()))),
           "sharded_param": torch.tensor(any(hasattr(p, "full_tensor") for p in sharded.parameters())),
           "noise_std": torch.tensor(min(float(m.noise_std.max()) for m in gift_layers(ref).values()))}
    with gathered(sharded):
        out["sharded"] = {n: m.salient_weight.detach().clone() for n, m in gift_layers(sharded).items()}
        out["base"] = {n: m.weight.detach().clone() for n, m in gift_layers(sharded).items()}
    out["ref"] = {n: m.salient_weight.detach().clone() for n, m in gift_layers(ref).items()}
    out["init"] = {n: m.salient_weight.detach().clone() for n, m in gift_layers(_gift_model("weight")).items()}
    # checkpoint from the gathered state (rank 0 writes), then resume into a fresh sharded model
    method = methods.get("gift-sw")
    ckpt = os.path.join(out_dir, "ckpt")
    method.save_checkpoint(sharded, ckpt)
    dist.barrier()
    fresh = _gift_model("weight")
    for block in fresh.model.layers:
        fully_shard(block)
    fully_shard(fresh)
    assert method.load_checkpoint(fresh, ckpt)
    with gathered(fresh):
        out["resumed"] = {n: m.salient_weight.detach().clone() for n, m in gift_layers(fresh).items()}
    try:  # merging in place on a shard is refused with a clear error
        next(iter(gift_layers(fresh).values())).merged_weight_()
        out["merge_refused"] = torch.tensor(False)
    except RuntimeError as e:
        out["merge_refused"] = torch.tensor("gathered" in str(e))
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_gift_sw_sharded_equals_one_process():
    """GIFT-SW with weight noise, every decoder block fully_shard-ed on 2 ranks (frozen weight,
    trainable columns and index buffer in one unit), 2 SGD steps on 2 rows per rank = one process
    on the 4-row global batch. The autograd function sees the all-gathered full weight (a plain
    tensor), the adapter written from the gathered state holds the trained columns, a sharded
    resume from it restores them, and an in-place merge of a shard is refused.

    Tolerance: the runs differ only in the order of fp32 reductions (the reduce-scatter averages
    two 2-row means instead of one 4-row mean; matmul blocking differs with the row count), a few
    ulps of the gradient; 2 SGD steps keep that near 1e-6 relative."""
    results = _run(_gift_worker)
    moved = 0.0
    for r in results:
        assert bool(r["seen_plain"]) and bool(r["seen_full"]) and bool(r["sharded_param"])
        assert bool(r["merge_refused"])
        assert float(r["noise_std"]) > 1e-4  # the noise is on: equality needs the same draw on both ranks
        for n, w in r["ref"].items():
            torch.testing.assert_close(r["sharded"][n], w, rtol=1e-5, atol=1e-6)
            assert torch.equal(r["resumed"][n], r["sharded"][n])
            moved = max(moved, float((w - r["init"][n]).abs().max()))
    assert moved > 1e-3  # the columns really trained
    assert torch.equal(results[0]["base"][next(iter(results[0]["base"]))],
                       results[1]["base"][next(iter(results[1]["base"]))])


# -- the --fsdp flag ----------------------------------------------------------------------------


def test_fsdp_flag_is_validated_and_refused_without_fsdp(tmp_path, monkeypatch):
    """--fsdp takes FSDP2's sharding strategies; in a single process it is refused before anything
    loads or is written (several CPU processes are refused after the Trainer is built, since
    accelerate 1.15 runs FSDP on accelerators only and would otherwise silently run DDP)."""
    import json

    from salientft.config import TrainConfig
    from salientft.train import train

    with pytest.raises(ValueError, match="fsdp"):
        TrainConfig(method="full", fsdp="hybrid")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}?", "response": f"It is {i}."}) + "\n"
                            for i in range(8)))
    cfg = TrainConfig(model="tiny-random-llama", data=str(data), output=str(tmp_path / "run"), method="full",
                      max_steps=1, batch_size=2, max_length=128, dtype="fp32", lr=1e-3, warmup_ratio=0.0,
                      fsdp="full_shard")
    assert cfg.to_dict()["fsdp"] == "full_shard"
    with pytest.raises(ValueError, match="shards across processes"):
        train(cfg)
    assert not (tmp_path / "run" / "run_config.json").exists()
    # accelerate's cpu_ram_efficient_loading (meta-device model on ranks > 0) is refused up front
    import dataclasses

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(ValueError, match="cpu_ram_efficient_loading"):
        train(dataclasses.replace(cfg, fsdp=""))
    assert not (tmp_path / "run" / "run_config.json").exists()


def test_gmt_refuses_deepspeed_and_fsdp1():
    """GMT's callback refuses DeepSpeed and FSDP1 (flat per-rank partitions: per-shard thresholds)
    with a message pointing to FSDP2; FSDP2 (the default fsdp_config version) passes."""
    from types import SimpleNamespace

    from salientft.gmt import _refuse_unsupported_sharding

    model = _tiny_blocks()
    with pytest.raises(NotImplementedError, match="DeepSpeed.*FSDP2"):
        _refuse_unsupported_sharding(SimpleNamespace(deepspeed="ds.json", fsdp=None), model)
    with pytest.raises(NotImplementedError, match="FSDP1.*fsdp_version: 2"):
        _refuse_unsupported_sharding(SimpleNamespace(deepspeed=None, fsdp=True, fsdp_config={"version": 1}), model)
    _refuse_unsupported_sharding(SimpleNamespace(deepspeed=None, fsdp=True, fsdp_config={"version": 2}), model)
    _refuse_unsupported_sharding(SimpleNamespace(deepspeed=None, fsdp=None, fsdp_config=None), model)


# -- the Trainer path: salientft train with --fsdp on 2 processes -------------------------------

# accelerate 1.15 turns FSDP on only on accelerators; on CPU processes it would run DDP (which
# salientft refuses). This launcher lifts that one restriction so that the Trainer-level FSDP2
# path (accelerate's fully_shard preparation, checkpoints, resume, outputs) runs on gloo here.
_CPU_FSDP_LAUNCHER = '''
import sys
import accelerate.state as st
from accelerate.utils import DistributedType

_init = st.AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *a, fsdp_plugin=None, **kw):
    _init(self, *a, fsdp_plugin=fsdp_plugin, **kw)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        st.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


st.AcceleratorState.__init__ = _init_fsdp_on_cpu

import accelerate
_get_state_dict = accelerate.Accelerator.get_state_dict


def _marked_get_state_dict(self, *a, **kw):  # the tests look for this line: a whole model was gathered
    print("salientft-test: full state dict gathered", file=sys.stderr, flush=True)
    return _get_state_dict(self, *a, **kw)


accelerate.Accelerator.get_state_dict = _marked_get_state_dict
from salientft.cli import main

sys.exit(main(sys.argv[1:]))
'''

_PORTS = iter(range(29621, 29700))


def _cli(tmp_path, argv, processes: int):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    if processes == 1:
        cmd = [sys.executable, "-m", "salientft.cli", *argv]
    else:
        launcher = tmp_path / "cpu_fsdp_launcher.py"
        launcher.write_text(_CPU_FSDP_LAUNCHER)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(next(_PORTS)), str(launcher), *argv]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _trained(out, method_output: str) -> dict:
    from pathlib import Path

    from safetensors.torch import load_file

    if method_output == "adapter":
        from salientft.gift import read_adapter

        return read_adapter(Path(out) / "adapter")[1]  # keys <layer>.salient_idx / .salient_weight / .noise_std
    return load_file(str(Path(out) / "model" / "model.safetensors"))


_TRAINER_CASES = {
    # weight noise; the default metric (gift) calibrates: under torchrun on rank 0 only, scores broadcast
    "gift-sw": ["--method", "gift-sw", "--n-salient", "4", "--calib-samples", "8"],
    "full": ["--method", "full"],
    "gmt-tensor": ["--method", "gmt", "--mask-granularity", "tensor"],
    "gmt-global": ["--method", "gmt", "--mask-granularity", "global", "--mask-mode", "strict"],
}


def _data(tmp_path) -> str:
    import json

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."}) + "\n"
                            for i in range(32)))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_TRAINER_CASES))
def test_trainer_fsdp_two_processes_match_one(tmp_path, case):
    """salientft train --fsdp full_shard on 2 gloo processes (2 rows each) ends with the weights of
    one process (4 rows): 3 AdamW steps. Tolerance as in the pure-torch tests: only the order of
    fp32 reductions differs (reduce-scatter of two 2-row means vs one 4-row mean), a few ulps per
    gradient, which 3 AdamW steps at lr 1e-3 keep within rtol 1e-4 / atol 1e-5 of the weights;
    a GMT entry kept in one run and not in the other would differ by ~lr = 1e-3."""
    from salientft import methods

    common = ["train", "--model", "tiny-random-llama", "--data", _data(tmp_path), *_TRAINER_CASES[case],
              "--max-steps", "3", "--dtype", "fp32", "--max-length", "64", "--lr", "1e-3", "--packing",
              "--warmup-ratio", "0"]
    _cli(tmp_path, [*common, "--batch-size", "4", "--save-steps", "2", "--output", str(tmp_path / "one")], 1)
    two = _cli(tmp_path, [*common, "--batch-size", "2", "--save-steps", "2", "--fsdp", "full_shard",
                          "--output", str(tmp_path / "two")], 2)
    # FSDP really ran: accelerate's FSDP checkpoint of the optimizer (DDP/one process: optimizer.pt)
    assert (tmp_path / "two" / "checkpoint-2" / "optimizer.bin").is_file()
    assert (tmp_path / "one" / "checkpoint-2" / "optimizer.pt").is_file()
    kind = methods.get(_TRAINER_CASES[case][1]).output
    # GIFT-SW's checkpoint is its adapter: no full-model file gathered and written beside it
    # nor a full state dict gathered, for a checkpoint or at the end (the dense methods need one)
    assert (tmp_path / "two" / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file() == (kind != "adapter")
    assert ("salientft-test: full state dict gathered" in two.stderr) == (kind != "adapter")
    a, b = _trained(tmp_path / "one", kind), _trained(tmp_path / "two", kind)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    if kind == "adapter":  # the fingerprint taken before sharding is the unsharded base's
        from salientft.gift import read_adapter

        fps = {read_adapter(tmp_path / run / "adapter")[0]["base_fingerprint"] for run in ("one", "two")}
        assert len(fps) == 1 and None not in fps
    from salientft.models import tiny_random_llama

    base = tiny_random_llama(seed=0).state_dict()
    if kind == "adapter":
        moved = max(float((a[k] - base[k[: -len(".salient_weight")] + ".weight"][:, a[k[: -len("salient_weight")]
                                                                                       + "salient_idx"]]).abs().max())
                    for k in a if k.endswith("salient_weight"))
    else:
        moved = max(float((a[k] - base[k]).abs().max()) for k in a if k in base)
    assert moved > 1e-4  # training really moved the weights


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gift-sw", "gmt-global"])
def test_trainer_fsdp_resume_after_a_kill(tmp_path, case):
    """A sharded run killed after its first checkpoint (what it leaves on disk: run_config.json and
    the complete checkpoint-2) and resumed sharded ends where the uninterrupted sharded run ends:
    GIFT-SW's adapter checkpoint (gathered on rank 0, loaded into each rank's shards), the FSDP
    optimizer state (GMT strict: the moments the mask protects) and every rank's RNG state (the
    noise stream) are restored."""
    import shutil

    from salientft import methods

    common = ["train", "--model", "tiny-random-llama", "--data", _data(tmp_path), *_TRAINER_CASES[case],
              "--max-steps", "4", "--save-steps", "2", "--dtype", "fp32", "--max-length", "64", "--lr", "1e-3",
              "--packing", "--warmup-ratio", "0", "--batch-size", "2", "--fsdp", "full_shard"]
    straight = _cli(tmp_path, [*common, "--output", str(tmp_path / "straight")], 2)
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(tmp_path / "straight" / "run_config.json", killed / "run_config.json")
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", killed / "checkpoint-2")
    r = _cli(tmp_path, [*common, "--output", str(killed), "--resume"], 2)
    import json

    assert json.loads((killed / "metrics.json").read_text())["resumed_from"].endswith("checkpoint-2")
    # the resumed session trained steps 3 and 4 only (the progress bar never shows step 1)
    assert "| 1/4 [" in straight.stderr and "| 1/4 [" not in r.stderr and "| 4/4 [" in r.stderr
    kind = methods.get(_TRAINER_CASES[case][1]).output
    a, b = _trained(tmp_path / "straight", kind), _trained(killed, kind)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")


# -- GIFT-SW checkpoints gather the trained columns, not the base; calibration once -------------


class _GatherCounter:
    """Counts the bytes every all-gather on this rank returns (FSDP2's own, DTensor.full_tensor's,
    c10d's): a TorchDispatchMode sees each collective op with its output tensors."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = str(func)
                if "all_gather" in name or "allgather" in name:
                    for t in torch.utils._pytree.tree_leaves(out):
                        if isinstance(t, torch.Tensor):
                            counter.bytes += t.numel() * t.element_size()
                return out

        self.bytes, self.mode = 0, Mode()


def _checkpoint_bytes_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from salientft import methods
    from salientft.config import TrainConfig
    from salientft.gift import fingerprint, gift_layers, read_adapter
    from salientft.methods.sharding import base_fingerprint, gathered
    from salientft.models import tiny_random_llama

    _init(rank, world, init_file)
    method = methods.get("gift-sw")
    cfg = TrainConfig(method="gift-sw", model="tiny-random-llama", metric="magnitude", n_salient=4, dtype="fp32")
    model = method.prepare(tiny_random_llama(seed=0).train(), cfg)  # the fingerprint is taken here, unsharded
    unsharded_fp = fingerprint({n: m.base_weight() for n, m in gift_layers(model).items()})
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    counter = _GatherCounter()
    ckpt = os.path.join(out_dir, "ckpt")
    with counter.mode:
        method.save_checkpoint(model, ckpt)
    dist.barrier()
    checkpoint_bytes = counter.bytes
    counter.bytes = 0
    with counter.mode:
        trained = method.gather_trained(model)
    out = {"checkpoint_bytes": torch.tensor(checkpoint_bytes), "final_bytes": torch.tensor(counter.bytes),
           "trainable": torch.tensor(trainable)}
    with gathered(model):
        out["columns"] = {n: m.salient_weight.detach().clone() for n, m in gift_layers(model).items()}
    del model.salientft_base_fingerprint  # a model sharded by hand: the fingerprint from the shards
    out["fp_ok"] = torch.tensor(base_fingerprint(model) == unsharded_fp)
    if rank == 0:
        meta, tensors = read_adapter(os.path.join(ckpt, "adapter"))
        out["saved_fp_ok"] = torch.tensor(meta["base_fingerprint"] == unsharded_fp)
        out["saved"] = {n: tensors[f"{n}.salient_weight"] for n in out["columns"]}
        out["final"] = {n: trained["tensors"][f"{n}.salient_weight"] for n in out["columns"]}
        # the final model: a fresh base with the gathered columns attached, no calibration
        rebuilt = method.attach_trained(tiny_random_llama(seed=0), trained)
        out["rebuilt"] = {n: m.salient_weight.detach().clone() for n, m in gift_layers(rebuilt).items()}
        out["rebuilt_fp_ok"] = torch.tensor(rebuilt.salientft_base_fingerprint == unsharded_fp)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_gift_sw_sharded_checkpoint_gathers_the_columns_not_the_base():
    """A GIFT-SW checkpoint of a fully_shard-ed model (2 gloo ranks) all-gathers at most 1.5x the
    trainable bytes on each rank (the columns; the base fingerprint was taken before sharding),
    and so does the end of training (what rank 0 rebuilds the final model from). The adapter
    holds the full columns and the unsharded base's fingerprint; one computed from the shards,
    one weight at a time, is the same digest."""
    for rank, r in enumerate(_run(_checkpoint_bytes_worker)):
        trainable = int(r["trainable"])
        assert 0 < int(r["checkpoint_bytes"]) <= 1.5 * trainable, (int(r["checkpoint_bytes"]), trainable)
        assert 0 < int(r["final_bytes"]) <= 1.5 * trainable, (int(r["final_bytes"]), trainable)
        assert bool(r["fp_ok"])
        if rank == 0:
            assert bool(r["saved_fp_ok"]) and bool(r["rebuilt_fp_ok"])
            for n, w in r["columns"].items():
                assert torch.equal(r["saved"][n], w) and torch.equal(r["final"][n], w)
                assert torch.equal(r["rebuilt"][n], w)


def _calibration_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    import salientft.methods.gift_sw as gift_sw
    from salientft import methods
    from salientft.config import TrainConfig
    from salientft.gift import gift_layers
    from salientft.models import tiny_random_llama

    _init(rank, world, init_file)
    calls = []
    plain = gift_sw.gift_scores

    def counted(*a, **kw):
        calls.append(1)
        return plain(*a, **kw)

    gift_sw.gift_scores = counted
    gen = torch.Generator().manual_seed(50 + rank)  # each rank sees other data: only a broadcast agrees
    data = [{"input_ids": torch.randint(3, 200, (16,), generator=gen).tolist()} for _ in range(8)]
    cfg = TrainConfig(method="gift-sw", model="tiny-random-llama", metric="gift", n_salient=4, dtype="fp32",
                      calib_samples=8)
    model = methods.get("gift-sw").prepare(tiny_random_llama(seed=0).train(), cfg, data)
    gift_sw.gift_scores = plain
    out = {"calls": torch.tensor(len(calls)),
           "idx": {n: m.salient_idx.clone() for n, m in gift_layers(model).items()}}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_gift_sw_calibration_runs_once_and_every_rank_gets_its_scores():
    """Under a process group, GIFT-SW's preparation calibrates on rank 0 only and every rank
    receives its scores: the same salient columns on every rank even where the ranks' data differ."""
    r0, r1 = _run(_calibration_worker)
    assert int(r0["calls"]) == 1 and int(r1["calls"]) == 0
    assert r0["idx"].keys() == r1["idx"].keys()
    assert all(torch.equal(r0["idx"][n], r1["idx"][n]) for n in r0["idx"])
