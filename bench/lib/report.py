"""The one results writer: ``<stem>.json``, ``<stem>.md`` and (given a plot) ``<stem>.png``, each
written atomically, the JSON carrying the provenance block (``lib.provenance``) under
``"provenance"`` and the Markdown ending with its one-line summary.

Every benchmark, speed and quality, writes its results through ``write_report``; the test
tests/test_bench_lib.py holds each script to it.
"""
from __future__ import annotations

from pathlib import Path

from .provenance import provenance, summary


def write_report(stem: str | Path, result: dict, markdown: list[str] | str | None, plot=None, *,
                 dtype: str | None, seed, device: str | None = None, threads: int | None = None,
                 quiet: bool = False) -> dict:
    """Write the report of ``result`` (a JSON-able dict, given the ``provenance`` key) and return it.

    ``markdown``: the report's lines (or text); None writes no ``.md``. ``plot``: a callable
    returning a matplotlib figure, saved as ``.png``. ``dtype``, ``seed``, ``device``, ``threads``:
    as ``lib.provenance.provenance``. A report rewritten during a run (after each model, so a
    cut-short run leaves its finished part) is rewritten whole, block included.
    """
    from salientft._io import atomic_path, write_json

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    result["provenance"] = provenance(dtype, seed, device=device, threads=threads)
    write_json(stem.with_suffix(".json"), result)
    written = [".json"]
    if markdown is not None:
        text = markdown if isinstance(markdown, str) else "\n".join(markdown)
        text = text.rstrip("\n") + "\n\n" + summary(result["provenance"]) + "\n"
        with atomic_path(stem.with_suffix(".md")) as tmp:
            tmp.write_text(text)
        written.append(".md")
    if plot is not None:
        _save_plot(plot, stem.with_suffix(".png"))
        written.append(".png")
    if not quiet:
        print(f"wrote {stem}" + "/".join(written))
    return result


def _save_plot(plot, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from salientft._io import atomic_path

    fig = plot()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
