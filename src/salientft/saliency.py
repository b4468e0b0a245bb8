"""Per-column salience (docs/methods.md#sensitivity-metric) and the choice of the salient columns.

The generalized sensitivity of input column j of a layer with weight W (out, in):

    s_j = ||D_j||_tau * ||X_j||_rho ^ gamma,     D = W - Q_bits(W)   (quantize_rows, docs/methods.md#row-quantizer)

with tau, rho in {1, 2, "inf"} (norm of column j of D over the output rows; norm of channel j's
activations over the calibration tokens) and gamma in {0.5, 1, 2}. Presets (``METRICS``):

- ``gift``:       tau = rho = inf, gamma = 1:  max_i |D_ij| * max_t |x_tj|   (the paper's choice;
                  tau / rho / gamma may override it: this is the generalized metric)
- ``gift-g2``:    tau = rho = inf, gamma = 2:  max_i |D_ij| * (max_t |x_tj|)^2 (the authors' config)
- ``owq``:        sum_t x_tj^2 * ||D_j||_2^2   (OBD / OWQ: Hessian diagonal times squared error; the
                  square of tau = rho = 2, gamma = 1, which is what its scores file records)
- ``wanda``:      ||W_j||_1 * ||X_j||_2        (pruning error: D replaced by W itself)
- ``activation``: max_t |x_tj|                 (QUIK / SmoothQuant style)
- ``magnitude``:  ||W_j||_2                    (no statistics needed)
- ``random``:     uniform [0, 1), seeded per (seed, module name) (a control; no statistics)
"""
from __future__ import annotations

import json
import re
import zlib

import torch
from torch import nn

from ._io import atomic_path, read_safetensors
from .config_base import STATLESS_METRICS  # noqa: F401  (re-exported: saliency.STATLESS_METRICS)
from .calibration import norm_order
from .ops.grid import check_grid_bits, quantize_rows
from .targets import linear_weight, resolve_targets

METRICS = ("gift", "gift-g2", "owq", "wanda", "activation", "magnitude", "random")
GAMMAS = (0.5, 1.0, 2.0)

_PRESETS = {
    "gift": dict(tau="inf", rho="inf", gamma=1.0),
    "gift-g2": dict(tau="inf", rho="inf", gamma=2.0),
    # computed as ||X_j||_2^2 * ||D_j||_2^2 = (||D_j||_2 * ||X_j||_2)^2: the square of the generalized
    # metric at tau = rho = 2, gamma = 1, so it ranks exactly like it; recorded as what it ranks like
    "owq": dict(tau=2, rho=2, gamma=1.0),
    "wanda": dict(tau=1, rho=2, gamma=1.0),  # of W, not D
    "activation": dict(tau=None, rho="inf", gamma=1.0),
    "magnitude": dict(tau=2, rho=None, gamma=None),
    "random": dict(tau=None, rho=None, gamma=None),
}
_TUNABLE = ("gift", "gift-g2")


def resolve_metric(metric: str, tau=None, rho=None, gamma=None) -> dict:
    """Validate a metric name and its norm orders; returns {name, tau, rho, gamma}.

    Only the generalized presets (``gift``, ``gift-g2``) accept tau / rho / gamma overrides;
    the others have a fixed definition, and overriding them is an error rather than a surprise.
    """
    if not isinstance(metric, str) or metric.lower() not in METRICS:
        raise ValueError(f"unknown salience metric {metric!r}; choose one of {', '.join(METRICS)}")
    name = metric.lower()
    spec = dict(_PRESETS[name])
    given = {k: v for k, v in (("tau", tau), ("rho", rho), ("gamma", gamma)) if v is not None}
    if given and name not in _TUNABLE:
        raise ValueError(
            f"metric {name!r} has a fixed definition; tau/rho/gamma apply only to "
            f"{' and '.join(_TUNABLE)} (got {', '.join(f'{k}={v!r}' for k, v in given.items())})"
        )
    spec.update(given)
    if "tau" in given:
        spec["tau"] = norm_order(given["tau"], "tau")
    if "rho" in given:
        spec["rho"] = norm_order(given["rho"], "rho")
    if "gamma" in given:
        g = given["gamma"]
        try:
            g = float(g)
        except (TypeError, ValueError):
            g = None
        if g not in GAMMAS:
            raise ValueError(f"gamma must be one of 0.5, 1, 2, got {given['gamma']!r}")
        spec["gamma"] = g
    spec["name"] = name
    return spec


def _col_norm(M: torch.Tensor, p) -> torch.Tensor:
    """Norm of every column of M (out, in) over its rows, as float64 (in,)."""
    if p == "inf":
        return M.abs().amax(dim=0).double()
    if p == 2:
        return torch.linalg.vector_norm(M, ord=2, dim=0, dtype=torch.float64)
    return M.abs().sum(dim=0, dtype=torch.float64)


def _random_scores(name: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.rand(n, generator=g, dtype=torch.float32)


def saliency_scores(
    model: nn.Module,
    stats=None,
    metric: str = "gift",
    bits: int = 4,
    tau=None,
    rho=None,
    gamma=None,
    seed: int = 0,
    *,
    target_modules=None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Module name -> (in,) float32 salience of every input column (see the module docstring).

    ``stats`` is the output of :func:`salientft.collect_activation_stats` (its keys are the
    layers scored); ``magnitude`` and ``random`` need none (then every target layer is scored).
    Weights are read with :func:`salientft.targets.linear_weight` and quantized in float32.
    """
    spec = resolve_metric(metric, tau, rho, gamma)
    name = spec["name"]
    check_grid_bits(bits)
    if name in STATLESS_METRICS:
        targets = resolve_targets(model, target_modules if target_modules is not None else (list(stats) if stats else None))
    else:
        if not stats:
            raise ValueError(f"metric {name!r} needs activation statistics: run collect_activation_stats first")
        targets = resolve_targets(model, target_modules if target_modules is not None else list(stats))
        missing = [n for n in targets if n not in stats]
        if missing:
            raise ValueError(f"no activation statistics for {missing[0]!r} (and {len(missing) - 1} more)")
    from tqdm.auto import tqdm

    out = {}
    for mod_name, module in tqdm(targets.items(), total=len(targets), desc=f"{name} scores", unit="layer",
                                 disable=not progress):
        st = None if name in STATLESS_METRICS else stats[mod_name]
        out[mod_name] = layer_scores(mod_name, linear_weight(module), spec, st, bits=bits, seed=seed)
    return out


def layer_scores(name: str, weight: torch.Tensor, metric, stats=None, *, bits: int = 4, seed: int = 0) -> torch.Tensor:
    """(in,) float32 salience of one layer's input columns; ``weight`` is its (out, in) weight.

    ``metric`` is a preset name or a :func:`resolve_metric` spec; ``stats`` the layer's
    ActivationStats (None for the statistics-free metrics ``magnitude`` and ``random``, which
    are seeded by ``name``). What ``saliency_scores`` computes for each layer of a model.
    """
    spec = resolve_metric(metric) if isinstance(metric, str) else metric
    kind = spec["name"]
    W = weight.detach()
    n_in = W.shape[1]
    if kind not in STATLESS_METRICS:
        if stats is None:
            raise ValueError(f"metric {kind!r} needs activation statistics for {name!r}")
        if stats.in_features != n_in:
            raise ValueError(f"statistics for {name!r} have {stats.in_features} channels, the weight has {n_in}")
    if kind == "random":
        s = _random_scores(name, n_in, seed)
    elif kind == "magnitude":
        s = _col_norm(W.float(), 2)
    elif kind == "activation":
        s = stats.norm("inf")
    elif kind == "wanda":
        s = _col_norm(W.float(), 1) * stats.norm(2)
    else:
        Wf = W.float()
        D = Wf - quantize_rows(Wf, bits)[2]
        if kind == "owq":
            s = stats.sum_sq.double() * _col_norm(D, 2).pow(2)
        else:
            s = _col_norm(D, spec["tau"]) * stats.norm(spec["rho"]).pow(spec["gamma"])
        del D
    return s.to(torch.float32).cpu()


def select_salient(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, sorted ascending; ties go to the lower index."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError("scores must be a 1-D tensor")
    n = scores.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an integer in [0, {n}], got {k!r}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; cannot rank columns")
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values.to(torch.long)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
SCORES_FORMAT = "salientft.scores"
# metadata keys renamed since files were first written (docs/configuration.md#names): old -> new
RENAMED_METADATA = {"n_samples": "calib_samples"}


def save_scores(scores: dict[str, torch.Tensor], path, metadata: dict | None = None) -> None:
    """Write scores as safetensors (one float32 tensor per module name), atomically.

    Metadata values are stored as JSON strings (safetensors metadata is str -> str).
    """
    from safetensors.torch import save_file

    if not scores:
        raise ValueError("no scores to save")
    tensors = {}
    for k, v in scores.items():
        if not isinstance(v, torch.Tensor) or v.dim() != 1:
            raise ValueError(f"score of {k!r} must be a 1-D tensor")
        tensors[k] = v.detach().to(torch.float32).cpu().contiguous()
    meta = {"format": SCORES_FORMAT, "version": "1"}
    meta.update({str(k): json.dumps(v) for k, v in (metadata or {}).items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_scores(path, return_metadata: bool = False):
    """Read a scores file written by :func:`save_scores`: module name -> (in,) float32 tensor
    (and the decoded metadata dict with ``return_metadata=True``; a file written before a key
    was renamed reads with the current name, :data:`RENAMED_METADATA`)."""
    tensors, meta = read_safetensors(path, "scores")
    if meta.get("format") != SCORES_FORMAT:
        raise ValueError(f"{path} is not a salientft scores file (format={meta.get('format')!r})")
    for k, t in tensors.items():
        if t.dim() != 1 or not t.is_floating_point():
            raise ValueError(f"{path}: entry {k!r} is not a 1-D float tensor")
    if not return_metadata:
        return tensors
    decoded = {}
    for k, v in meta.items():
        if k in ("format", "version"):
            continue
        try:
            decoded[k] = json.loads(v)
        except json.JSONDecodeError:
            decoded[k] = v
    for old, new in RENAMED_METADATA.items():
        if old in decoded and new not in decoded:
            decoded[new] = decoded.pop(old)
    return tensors, decoded


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)\.(.+)$")


def _layer_and_type(name: str):
    m = _LAYER_RE.search(name)
    if m is None:
        return None, name
    return int(m.group(1)), m.group(2).rsplit(".", 1)[-1]


def _selection(scores, k_or_selected) -> dict[str, torch.Tensor]:
    sel = {}
    for n, s in scores.items():
        v = k_or_selected.get(n) if isinstance(k_or_selected, dict) else k_or_selected
        if v is None:
            raise ValueError(f"no k or selection given for {n!r}")
        if isinstance(v, float) and not isinstance(v, bool) and 0 < v < 1:
            v = max(1, round(v * s.numel()))
        if isinstance(v, int):
            sel[n] = select_salient(s, min(v, s.numel()))
        else:
            sel[n] = torch.as_tensor(v, dtype=torch.long).reshape(-1)
    return sel


def plot_scores(scores: dict[str, torch.Tensor], k_or_selected, path, title: str | None = None) -> None:
    """Write a PNG summarising where the salience is.

    ``k_or_selected``: an int k (the same in every layer), a fraction in (0, 1), or a dict
    module name -> k or -> selected indices. Panels: (1) layers x module types heat map of the
    share of the layer's salience mass held by its selected columns (a uniform score would give
    k/in, printed in each cell's corner); (2) the sorted salience profile per module type (median
    over layers, normalised by the layer's maximum); (3) which input channels are selected in
    each layer, for the most common input width (shared outlier channels show up as columns).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    if not scores:
        raise ValueError("no scores to plot")
    sel = _selection(scores, k_or_selected)
    names = list(scores)
    parsed = {n: _layer_and_type(n) for n in names}
    layers = sorted({l for l, _ in parsed.values() if l is not None}) or [0]
    types = list(dict.fromkeys(t for _, t in parsed.values()))
    share = np.full((len(layers), len(types)), np.nan)
    for n in names:
        l, t = parsed[n]
        s = scores[n].double().clamp_min(0)
        tot = float(s.sum())
        share[layers.index(l if l is not None else 0), types.index(t)] = float(s[sel[n]].sum()) / tot if tot > 0 else np.nan
    widths = [scores[n].numel() for n in names]
    common = max(set(widths), key=widths.count)
    raster_names = [n for n in names if scores[n].numel() == common]

    fig = plt.figure(figsize=(15, max(5.5, 0.22 * len(layers) + 2.5)), constrained_layout=True)
    gs = fig.add_gridspec(1, 3, width_ratios=[max(2.5, 0.55 * len(types)), 3.5, 5])
    ax = fig.add_subplot(gs[0])
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(types)), types, rotation=60, ha="right")
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_ylabel("layer")
    ax.set_title("salience share of selected columns")
    fig.colorbar(im, ax=ax, shrink=0.8, label="top-k mass / total (uniform = k/in)")
    if len(layers) * len(types) <= 80:
        for i in range(len(layers)):
            for j in range(len(types)):
                if not np.isnan(share[i, j]):
                    ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] < 0.6 else "black")

    ax = fig.add_subplot(gs[1])
    for t in types:
        curves = []
        for n in names:
            if parsed[n][1] != t:
                continue
            s = torch.sort(scores[n].double(), descending=True).values
            m = float(s[0]) if s.numel() and float(s[0]) > 0 else 1.0
            curves.append(np.interp(np.linspace(0, 1, 200), np.linspace(0, 1, s.numel()), (s / m).numpy()))
        ax.plot(np.linspace(0, 100, 200), np.median(np.array(curves), axis=0), label=t)
    ks = [sel[n].numel() / scores[n].numel() * 100 for n in names]
    ax.axvline(float(np.median(ks)), color="k", ls="--", lw=1, label=f"k ({np.median(ks):.1f}% of columns)")
    ax.set_yscale("log")
    ax.set_xlabel("column rank (% of in_features)")
    ax.set_ylabel("score / layer max (median over layers)")
    ax.set_title("sorted salience profile")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = fig.add_subplot(gs[2])
    raster = np.zeros((len(raster_names), common))
    for i, n in enumerate(raster_names):
        raster[i, sel[n].numpy()] = 1
    ax.imshow(raster, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xlabel(f"input channel (modules with in_features = {common})")
    step = max(1, len(raster_names) // 30)
    ax.set_yticks(range(0, len(raster_names), step),
                  [f"{parsed[n][0]}.{parsed[n][1]}" for n in raster_names[::step]], fontsize=7)
    ax.set_title("selected columns per module (black = selected)")
    counts = raster.sum(axis=0)
    top = np.argsort(-counts, kind="stable")[:5]
    ax.text(0.0, -0.12, "most often selected channels: " + ", ".join(f"{c} ({int(counts[c])}x)" for c in top),
            transform=ax.transAxes, fontsize=8, va="top")
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
