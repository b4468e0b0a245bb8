"""bench/lib: the harness every benchmark script shares, so that no script writes its own.

Scripts under ``bench/`` import from here (``from lib.timing import interleave``; running
``python bench/x.py`` puts ``bench/`` on ``sys.path``), and from the shared ``_suite.py``,
``_memory.py`` and ``_machine.py``, never from each other.

- ``provenance``: the block every results file records (commit and dirty tree, CPU, GPU, torch,
  threads, ``OMP_WAIT_POLICY``, dtype, seed).
- ``report``: the one results writer (``<stem>.json``, ``.md``, ``.png``, each atomic) that adds it.
- ``timing``: the interleaved round-robin timing loop and its clocks (wall, process CPU, CUDA events).
- ``stats``: medians, quartiles, per-round ratios.
- ``models``: the benchmark models (SmolLM2, random Llamas by name) and a batch of real text.
- ``methods``: each method prepared as ``salientft train`` prepares it, the authors'
  re-implementation, the training step and the per-method peak-memory measurement.
- ``cli``: the shared ``--dtype`` option (``fp32``/``bf16``; ``float32``/``bfloat16`` accepted).

Importing the package puts this checkout's ``src/`` first on ``sys.path``, so a benchmark measures
the code next to it, not an installed copy.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
