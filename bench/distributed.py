"""Step time and peak memory per rank: one process vs DDP vs FSDP2 (``fully_shard``) on 2 processes.

Full fine-tuning (AdamW, fp32) of a random Llama wide enough that the training state dominates
(``salientft.models.tiny_random_llama(**overrides)``), the same global batch in every setting
(one process: 2 x --batch rows; 2 processes: --batch rows each). Each setting runs in fresh
processes (spawned) so their memory does not mix. Per rank it records the median step time,
the peak memory during the steps (CPU: the resident set's high-water mark, /proc VmHWM, minus the
process's resident set before its model was built; CUDA: the allocator's peak) and the
exact bytes of this rank's training state (its parameters, gradients and AdamW moments: under
FSDP2 only its shards). Writes docs/results/distributed.{json,md}.

    .venv/bin/python bench/distributed.py                  # CPU, gloo, 1 thread per process
    .venv/bin/python bench/distributed.py --device cuda    # NCCL, one GPU per process
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the spawned workers import this file
from _machine import machine_info  # noqa: E402  bench/_machine.py
from _memory import MALLOC_ENV, peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402  bench/_memory.py
from lib import RESULTS, ROOT  # noqa: E402  bench/lib
from lib.models import random_llama  # noqa: E402
from lib.report import write_report  # noqa: E402
from lib.stats import median  # noqa: E402

SEEDS = {"model": 0, "batches": 1}
SETTINGS = (("1 process", 1, "none"), ("DDP x2", 2, "ddp"), ("FSDP2 x2", 2, "fsdp"))


def _local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _worker(rank, world, mode, args, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    base = rss_bytes()  # the process before its model: interpreter, torch, transformers
    cuda = args.device == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
    shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                 num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64)
    model = random_llama(shape, torch.float32, seed=SEEDS["model"])[0].to(dev).train()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        wrapped = fully_shard(model)
    else:
        wrapped = model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = args.batch * (2 if world == 1 else 1)
    gen = torch.Generator().manual_seed(SEEDS["batches"])
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        reset_peak_rss()
    for step in range(args.warmup + args.steps):
        ids = torch.randint(3, model.config.vocab_size, (2 * args.batch, args.seq), generator=gen)
        ids = (ids if world == 1 else ids[rank * rows:(rank + 1) * rows]).to(dev)
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        wrapped(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize(dev)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    state = sum(_local_bytes(p) + _local_bytes(p.grad) for p in model.parameters())
    state += sum(_local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    peak = torch.cuda.max_memory_allocated(dev) if cuda else peak_rss_bytes() - base
    res = {"rank": rank, "step_s": median(times), "peak_bytes": peak, "state_bytes": state,
           "params": sum(p.numel() for p in model.parameters())}
    (Path(out_dir) / f"{mode}-{world}-{rank}.json").write_text(json.dumps(res))
    if world > 1:
        dist.destroy_process_group()


def run(args) -> dict:
    import torch.multiprocessing as mp

    os.environ.update(MALLOC_ENV)  # inherited by the spawned workers
    os.environ.setdefault("PYTHONPATH", str(ROOT / "src"))
    results = []
    with tempfile.TemporaryDirectory() as d:
        for label, world, mode in SETTINGS:
            mp.start_processes(_worker, args=(world, mode, args, os.path.join(d, f"init-{mode}"), d), nprocs=world,
                               join=True, start_method="spawn")
            ranks = [json.loads((Path(d) / f"{mode}-{world}-{r}.json").read_text()) for r in range(world)]
            results.append({"setting": label, "processes": world, "mode": mode, "ranks": ranks,
                            "step_s": max(r["step_s"] for r in ranks),
                            "peak_bytes": max(r["peak_bytes"] for r in ranks),
                            "state_bytes": max(r["state_bytes"] for r in ranks)})
            print(f"{label}: step {results[-1]['step_s']:.2f} s, peak {results[-1]['peak_bytes'] / 2**20:.0f} MiB, "
                  f"training state {results[-1]['state_bytes'] / 2**20:.0f} MiB per rank", flush=True)
    by = {r["mode"]: r for r in results}
    return {
        "model": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                  "params": results[0]["ranks"][0]["params"]},
        "batch_rows_global": 2 * args.batch, "seq": args.seq, "steps": args.steps, "device": args.device,
        "threads_per_process": args.threads,
        "machine": machine_info(),
        "results": results,
        "fsdp_over_ddp": {"peak": by["fsdp"]["peak_bytes"] / by["ddp"]["peak_bytes"],
                          "state": by["fsdp"]["state_bytes"] / by["ddp"]["state_bytes"],
                          "step": by["fsdp"]["step_s"] / by["ddp"]["step_s"]},
    }


def report(res: dict) -> str:
    m, mach = res["model"], res["machine"]
    lines = [
        f"Random Llama, hidden {m['hidden']}, intermediate {m['intermediate']}, {m['layers']} layers "
        f"({m['params'] / 1e6:.1f}M parameters), full fine-tuning with fp32 AdamW, global batch "
        f"{res['batch_rows_global']} x {res['seq']} tokens, median of {res['steps']} steps; device "
        f"{res['device']}, {res['threads_per_process']} thread(s) per process, CPU {mach.get('cpu_model')}.",
        "",
        "| setting | step time (s, slowest rank) | peak memory per rank above the bare process (MiB) | training state per rank (MiB) |",
        "|---|---|---|---|",
    ]
    for r in res["results"]:
        lines.append(f"| {r['setting']} | {r['step_s']:.2f} | {r['peak_bytes'] / 2**20:.0f} | "
                     f"{r['state_bytes'] / 2**20:.0f} |")
    f = res["fsdp_over_ddp"]
    lines += ["", f"FSDP2 / DDP per rank: peak memory {f['peak']:.2f}, training state {f['state']:.2f}, "
                  f"step time {f['step']:.2f}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2, help="rows per rank (one process: twice this)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--out", default=str(RESULTS / "distributed"))
    args = ap.parse_args(argv)
    res = run(args)
    write_report(Path(args.out), res, report(res), dtype="fp32", seed=SEEDS, device=args.device,
                 threads=args.threads)
    print(report(res))


if __name__ == "__main__":
    main()
