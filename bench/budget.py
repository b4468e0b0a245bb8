"""Machine time of a preset's parts, from its run cache: what docs/RESULTS.md's budget tables quote.

Every finished run of the suite is one record in ``<out>/runs/<preset>/<key>.json`` with the
seconds it took (bench/_suite.py, ``Runs.get``). This script reads those records (it trains and
measures nothing) and writes ``<out>/budget.{json,md}``: per part, the number of runs and their
summed machine time; per part and kind of run (grid run, evaluated run, the untrained baseline,
quantized model, recovery, ...) the fewest and most minutes one took, and per method within a
kind; the totals. For the ``full`` preset it adds the speed part's wall-clock time from
``step.json`` and ``scaling.json``.

Which part ran a record: its ``part`` field (records written since ``Runs`` records it), else
its ``spec`` (``classify``): the parts' specs have distinct keys (``eval_tasks: ""`` a grid run,
``_quantize`` a recovery, ``_keep`` a training kept for quantizing, ...). A record that matches
no rule is an error naming its file, never dropped. A quantized model made again by newer
quantization code (its spec gained ``quant_code``) supersedes the older record of the same
settings; the older one, and recoveries started from it, are listed as superseded and left out
of the totals (delete those files once the new runs are complete).

    .venv/bin/python bench/budget.py --paper500   # docs/results/paper500/budget.{json,md}
    .venv/bin/python bench/budget.py              # the full preset: docs/results/budget.{json,md}
    PYTHONPATH=src .venv/bin/python scripts/render_docs.py   # then re-render docs/RESULTS.md's tables
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _suite as S

PARTS = ("quality", "ablations", "quantization", "noise_scale", "recovery", "quantize_order")  # bench/<part>.py
LABELS = {"noise_scale": "noise scale", "quantize_order": "orders"}
KINDS = {  # kind of run: (label, the spec keys it may have)
    "base": ("the untrained baseline, evaluated", {"method"}),
    "grid": ("grid run (held-out loss, no evaluation)", {"method", "seed", "lr", "lora_r", "mask_ratio", "eval_tasks"}),
    "evaluated": ("training run, evaluated", {"method", "seed", "lr", "lora_r", "mask_ratio", "noise", "noise_bits",
                                              "metric"}),
    "bf16": ("the bf16 model measured (not quantized)", {"part", "method", "bits", "salient_fraction", "samples",
                                                         "seq_len", "text_tokens"}),
    "quantized": ("quantized model, measured and evaluated", {"part", "method", "bits", "salient_fraction", "samples",
                                                             "seq_len", "text_tokens", "quant_code"}),
    "recovery": ("recovery of a quantized model, evaluated", {"method", "seed", "lr", "lora_r", "_start", "_quantize"}),
    "train_only": ("training kept for quantizing (no evaluation)", {"method", "seed", "lr", "eval_tasks", "_keep"}),
    "quantize_trained": ("a trained model quantized and evaluated", {"part", "method", "bits", "salient_fraction",
                                                                    "samples", "seq_len", "text_tokens", "quant_code",
                                                                    "trained"}),
}
SHORT = {"base": "base", "grid": "grid runs", "evaluated": "evaluated", "bf16": "bf16", "quantized": "quantized models",
         "recovery": "recoveries", "train_only": "trainings without evaluation",
         "quantize_trained": "trained models quantized"}
QUALITY_MASK_RATIO = 0.5  # GMT's ratio in quality.py (_suite.quality_spec); another one is an ablation


class Unclassified(ValueError):
    """A record no rule places: the budget would silently miss its time."""


def kind_of(spec: dict) -> str | None:
    """The kind of run a spec describes, or None when no rule (or an unknown key) matches."""
    if spec == {"method": "base"}:
        kind = "base"
    elif spec.get("part") == "quantize":
        kind = "bf16" if spec.get("method") == "bf16" else "quantized"
    elif spec.get("part") == "quantize-trained":
        kind = "quantize_trained"
    elif "part" in spec or "method" not in spec or spec["method"] == "base":
        return None
    elif "_quantize" in spec:
        kind = "recovery"
    elif "_keep" in spec:
        kind = "train_only"
    elif "eval_tasks" in spec:
        kind = "grid" if spec["eval_tasks"] == "" else None
    else:
        kind = "evaluated"
    return kind if kind is not None and set(spec) <= KINDS[kind][1] else None


def part_of_spec(spec: dict, kind: str, preset: S.Preset) -> str:
    """The part that runs ``spec`` (records from before ``Runs`` recorded the part). A preset with a
    subset (the 500-item refresh) has no quantization part, its learning rates are tuned (every spec
    has ``lr``) and recovery makes its own quantized models."""
    tuned = preset.eval_subset is not None
    if kind in ("base", "grid"):
        return "quality"
    if kind in ("bf16", "quantized"):
        return "recovery" if tuned else "quantization"
    if kind in ("train_only", "quantize_trained"):
        return "quantize_order"
    if kind == "recovery":  # seed 0 is recovery.py's; quantize_order.py recovers GIFT-SW with the other seeds
        return "recovery" if spec.get("seed", 0) == 0 else "quantize_order"
    if "noise_bits" in spec or (spec.get("noise") and spec["method"] == "full"):
        return "noise_scale"
    ablation = ("noise" in spec or "metric" in spec or ("lr" in spec and not tuned)
                or ("mask_ratio" in spec and (spec["method"] != "gmt" or spec["mask_ratio"] != QUALITY_MASK_RATIO)))
    return "ablations" if ablation else "quality"


def classify(rec: dict, preset: S.Preset, where: str = "") -> tuple[str, str]:
    """(part, kind) of one cached record; its recorded ``part`` wins over the spec's rules."""
    spec = rec.get("spec")
    kind = kind_of(spec) if isinstance(spec, dict) else None
    if kind is None:
        raise Unclassified(f"{where}: no kind of run matches its spec {spec!r}: teach bench/budget.py's "
                           f"KINDS the new spec (it would otherwise be missing from the budget)")
    part = rec.get("part") or part_of_spec(spec, kind, preset)
    if part not in PARTS:
        raise Unclassified(f"{where}: its part {part!r} is none of {', '.join(PARTS)}")
    return part, kind


def read_records(runs_dir: Path) -> dict[str, dict]:
    """{file name: record} of every cached run; an unreadable file is an error (its time would be missing)."""
    out = {}
    for p in sorted(runs_dir.glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise Unclassified(f"{p}: not JSON ({e})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("seconds"), (int, float)):
            raise Unclassified(f"{p}: a run record has a number of 'seconds'")
        out[p.name] = rec
    return out


def superseded(records: dict[str, dict]) -> set[str]:
    """Quantized models made again by newer code (the newest record of the same settings, one naming
    its ``quant_code`` first, is current), and the recoveries started from the older ones."""
    groups: dict[str, list[str]] = {}
    for name, rec in records.items():
        spec = rec.get("spec") or {}
        if spec.get("part") in ("quantize", "quantize-trained"):
            settings = json.dumps({k: v for k, v in spec.items() if k != "quant_code"}, sort_keys=True)
            groups.setdefault(settings, []).append(name)
    old = set()
    for names in groups.values():
        names.sort(key=lambda n: ("quant_code" in records[n]["spec"], records[n].get("finished", "")))
        old.update(names[:-1])
    old_keys = {records[n].get("key") for n in old}
    return old | {n for n, r in records.items() if (r.get("spec") or {}).get("_quantize") in old_keys}


def _span(seconds: list[float]) -> dict:
    return {"runs": len(seconds), "minutes": round(sum(seconds) / 60, 2), "hours": round(sum(seconds) / 3600, 2),
            "min_minutes": round(min(seconds) / 60, 2), "max_minutes": round(max(seconds) / 60, 2)}


def budget(records: dict[str, dict], preset: S.Preset, where: str = "") -> dict:
    """Runs and machine time per part, per kind within a part and per method within a kind; totals."""
    old = superseded(records)
    seconds: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, rec in records.items():
        part, kind = classify(rec, preset, f"{where}/{name}")
        if name not in old:
            method = rec["spec"]["method"]
            seconds.setdefault(part, {}).setdefault(kind, {}).setdefault(method, []).append(float(rec["seconds"]))
    parts = {}
    for part in (p for p in PARTS if p in seconds):
        kinds = {k: {**_span([s for v in by_method.values() for s in v]), "label": KINDS[k][0],
                     "methods": {m: _span(v) for m, v in sorted(by_method.items())}}
                 for k, by_method in sorted(seconds[part].items(), key=lambda kv: list(KINDS).index(kv[0]))}
        parts[part] = {**_span([s for by_method in seconds[part].values() for v in by_method.values() for s in v]),
                       "kinds": kinds}
    every = [s for p in seconds.values() for k in p.values() for v in k.values() for s in v]
    return {"parts": parts, "total": _span(every) if every else {"runs": 0},
            "superseded": {"runs": len(old), "minutes": round(sum(records[n]["seconds"] for n in old) / 60, 2),
                           "files": sorted(old)}}


def speed(out: Path) -> dict | None:
    """The speed part's wall-clock time (step.py and scaling.py record theirs as ``wall_s``)."""
    found = {}
    for name in ("step", "scaling"):
        p = out / f"{name}.json"
        wall = json.loads(p.read_text()).get("wall_s") if p.is_file() else None
        if isinstance(wall, (int, float)):
            found[name] = round(wall / 60, 2)
    return {"minutes": found, "total_minutes": round(sum(found.values()), 2)} if found else None


def _flag(preset: S.Preset) -> str:
    return "" if preset.name == "full" else f" --{preset.name}"


def _time(e: dict) -> str:
    """An entry's machine time: hours from 90 minutes up (as docs/RESULTS.md quotes its ``hours``)."""
    minutes = e["minutes"]
    return f"{e['hours']:.1f} h" if minutes >= 90 else f"{minutes:.0f} min" if minutes >= 10 else f"{minutes:.1f} min"


def _range(e: dict) -> str:
    lo, hi = f"{e['min_minutes']:.1f}", f"{e['max_minutes']:.1f}"
    return lo if lo == hi else f"{lo}-{hi}"


def markdown(r: dict) -> list[str]:
    flag = _flag(S.PRESETS[r["preset"]])
    lines = [f"# Machine time of the `{r['preset']}` preset (bench/budget.py)", "",
             f"Command: `.venv/bin/python {r['command']}`. The sum of the seconds each cached run in "
             f"`{r['runs_dir']}` recorded (training, calibration, held-out loss and evaluation, on the threads "
             "and beside the load of its sitting), not the wall-clock time of the sittings, which ran parts "
             "side by side at times.", "",
             "| part | command | runs | of which | machine time |", "|---|---|---|---|---|"]
    for part, e in r["parts"].items():
        kinds = ", ".join(f"{k['runs']} {SHORT[name]}" for name, k in e["kinds"].items())
        lines.append(f"| {LABELS.get(part, part)} | `bench/{part}.py{flag}` | {e['runs']} | {kinds} | "
                     f"{_time(e)} |")
    if r.get("speed"):
        s = r["speed"]
        lines.append("| speed | `bench/step.py --model smollm2-135m`, `bench/scaling.py` | - | "
                     + ", ".join(f"{k}.py {v:.1f} min" for k, v in s["minutes"].items())
                     + f" (wall clock) | {_time({'minutes': s['total_minutes'], 'hours': 0})} |")
    t = r["total"]
    lines += [f"| all runs | `bench/suite.py{flag}` | {t['runs']} | | {_time(t) if t['runs'] else '-'} |",
              "", "Kinds of run: " + "; ".join(f"**{SHORT[k]}**: {label}" for k, (label, _) in KINDS.items()) + ".", "",
              "| part | kind | runs | minutes each | minutes in all | per method (minutes each) |",
              "|---|---|---|---|---|---|"]
    for part, e in r["parts"].items():
        for kind, k in e["kinds"].items():
            methods = "; ".join(f"{m} {_range(v)}" for m, v in k["methods"].items())
            lines.append(f"| {LABELS.get(part, part)} | {SHORT[kind]} | {k['runs']} | {_range(k)} | {k['minutes']:.0f} | "
                         f"{methods} |")
    if r["superseded"]["runs"]:
        lines += ["", f"Left out: {r['superseded']['runs']} superseded record(s) ({r['superseded']['minutes']:.0f} min): "
                  "quantized models made again by newer code and the runs started from them: "
                  + ", ".join(r["superseded"]["files"]) + "."]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the quick preset's cache (docs/results/quick/)")
    g.add_argument("--smoke", action="store_true", help="the smoke preset's cache (needs --out)")
    g.add_argument("--paper500", action="store_true", help="the 500-item refresh's cache (docs/results/paper500/)")
    p.add_argument("--out", default=None, help="results folder holding runs/<preset>/ (default: the preset's)")
    args = p.parse_args(argv)
    preset, out = S.resolve(args)
    runs_dir = out / "runs" / preset.name
    if not runs_dir.is_dir():
        raise SystemExit(f"{runs_dir} does not exist: no run of the {preset.name} preset is cached there")
    rel = runs_dir.resolve().relative_to(S.ROOT) if runs_dir.resolve().is_relative_to(S.ROOT) else runs_dir
    try:
        result = budget(read_records(runs_dir), preset, str(rel))
    except Unclassified as e:
        raise SystemExit(str(e)) from None
    result = {"preset": preset.name, "runs_dir": str(rel), "command": f"bench/budget.py{_flag(preset)}", **result}
    if preset.name == "full":
        result["speed"] = speed(out)
    S.write_report(out, "budget", result, markdown(result), preset=preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
