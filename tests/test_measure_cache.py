"""The measure cache (salientft.evaluation.cache): an unchanged base measured the same way is read
back, bit for bit; anything that could change a number misses."""
import json
from pathlib import Path

import pytest
import torch

from salientft import train as train_mod
from salientft.config import TrainConfig
from salientft.evaluation import cache


def tiny_config(tmp_path, **kw):
    """A one-step ``salient`` run of the tiny model on 8 embedded conversations, evaluated on BoolQ."""
    return TrainConfig(model="tiny-random-llama", data="embedded", data_limit=8, output=str(tmp_path / "run"),
                       method="salient", max_steps=1, batch_size=4, max_length=384, dtype="fp32", lr=1e-3,
                       metric="magnitude", n_salient=4, warmup_ratio=0.0, eval_tasks="boolq", **kw)


@pytest.fixture
def measure_cache(tmp_path, monkeypatch):
    """The cache on (the suite turns it off), in a folder of its own."""
    monkeypatch.delenv(cache.DISABLE_ENV, raising=False)
    monkeypatch.delenv("SALIENTFT_MEASURE_SEED", raising=False)
    root = tmp_path / "cache" / "measures"  # not SALIENTFT_CACHE: the embedded files stay where they are
    monkeypatch.setattr(cache, "cache_root", lambda: root)
    return root


def test_fingerprint_sees_every_byte_dtype_and_tie(tiny_model):
    fp = cache.model_fingerprint(tiny_model)
    assert cache.model_fingerprint(tiny_model) == fp
    with torch.no_grad():
        w = tiny_model.model.layers[1].mlp.down_proj.weight
        old = w[3, 5].clone()
        w[3, 5] = torch.nextafter(old, torch.tensor(float("inf")))  # one ulp
        assert cache.model_fingerprint(tiny_model) != fp
        w[3, 5] = old
    assert cache.model_fingerprint(tiny_model) == fp
    assert cache.model_fingerprint(tiny_model.to(torch.bfloat16)) != fp


def test_fingerprint_is_the_model_not_the_folder_it_was_read_from(tiny_model, tmp_path):
    """The same weights saved to two folders (two users' cache directories) and read back have one
    fingerprint, so a shipped entry is found wherever salientft's cache lives; a config value that
    changes the model still changes it."""
    from transformers import AutoModelForCausalLM

    fps = []
    for folder in ("a", "elsewhere/b"):
        tiny_model.save_pretrained(tmp_path / folder)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder, dtype=torch.float32)
        assert loaded.config._name_or_path.endswith(folder)
        fps.append(cache.model_fingerprint(loaded))
    assert fps[0] == fps[1] == cache.model_fingerprint(tiny_model)
    loaded.config.rms_norm_eps *= 2
    assert cache.model_fingerprint(loaded) != fps[0]


def test_cached_computes_once_and_misses_on_any_field(measure_cache):
    calls = []

    def compute(v):
        def f():
            calls.append(v)
            return {"x": v, "pi": 3.141592653589793}
        return f

    assert cache.cached("eval", {"a": 1}, compute(1)) == ({"x": 1, "pi": 3.141592653589793}, False)
    assert cache.cached("eval", {"a": 1}, compute(2)) == ({"x": 1, "pi": 3.141592653589793}, True)  # read back
    assert cache.cached("eval", {"a": 2}, compute(3))[1] is False  # another field: measured
    assert cache.cached("heldout", {"a": 1}, compute(4))[1] is False  # another kind: measured
    assert calls == [1, 3, 4]


def test_a_broken_entry_is_measured_again(measure_cache, caplog):
    cache.cached("eval", {"a": 1}, lambda: 1)
    entry = next(measure_cache.glob("eval-*.json"))
    entry.write_text("{not json")
    assert cache.cached("eval", {"a": 1}, lambda: 2) == (2, False)
    assert "broken cache entry" in caplog.text
    assert cache.cached("eval", {"a": 1}, lambda: 3) == (2, True)


def test_the_switch_turns_it_off(measure_cache, monkeypatch):
    monkeypatch.setenv(cache.DISABLE_ENV, "1")
    assert cache.cached("eval", {"a": 1}, lambda: 1) == (1, False)
    assert cache.cached("eval", {"a": 1}, lambda: 2) == (2, False)
    assert not measure_cache.exists()


def test_code_version_follows_the_measuring_code(monkeypatch):
    base = cache.code_version("eval")
    assert cache.code_version("eval") == base and cache.code_version("heldout") != base
    assert cache.code_version("heldout", "def f(): pass") != cache.code_version("heldout")
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert cache.code_version("eval") != base


def test_seed_copies_only_missing_entries(measure_cache, tmp_path):
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "eval-a.json").write_text("shipped")
    (seed / "eval-b.json").write_text("shipped")
    measure_cache.mkdir(parents=True)
    (measure_cache / "eval-a.json").write_text("local")
    cache.seed_from(seed)
    assert (measure_cache / "eval-a.json").read_text() == "local" and (measure_cache / "eval-b.json").read_text() == "shipped"


def test_train_reads_its_unchanged_base_from_the_cache(tmp_path, measure_cache, monkeypatch):
    """A second run of the same base and settings reads the "before" measures (identical numbers,
    files and per-item records) and evaluates only "after"; another eval setting measures again."""
    from salientft import evaluation

    calls = []
    real = evaluation.evaluate

    def counting(*a, **kw):
        calls.append(kw.get("limit"))
        return real(*a, **kw)

    monkeypatch.setattr(evaluation, "evaluate", counting)
    cfg = tiny_config(tmp_path, eval_limit=2)
    first = train_mod.train(cfg)
    before_file = (Path(cfg.output) / "eval_before.json").read_text()
    samples = (Path(cfg.output) / "eval_before.samples.jsonl").read_text()
    assert len(calls) == 2 and not first["eval_before"].get("from_cache")
    assert {p.name.split("-")[0] for p in measure_cache.iterdir()} == {"eval", "heldout"}
    second = train_mod.train(cfg, overwrite=True)
    assert len(calls) == 3  # only "after" evaluated
    assert second["eval_before"]["from_cache"] is True
    assert second["eval_before"]["results"] == first["eval_before"]["results"]
    assert second["heldout_loss_before"] == first["heldout_loss_before"]  # bit for bit
    assert (Path(cfg.output) / "eval_before.samples.jsonl").read_text() == samples
    assert json.loads((Path(cfg.output) / "eval_before.json").read_text())["results"] == json.loads(before_file)["results"]
    # another limit is another measurement
    train_mod.train(tiny_config(tmp_path, eval_limit=3), overwrite=True)
    assert calls[-2:] == [3, 3]


def test_the_quick_starts_shipped_measures_are_current():
    """configs/quickstart_measures/ was keyed with the current measuring code; else the quick start
    silently measures its base again (minutes): rerun scripts/quickstart_measures.py and commit it."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("quickstart_measures", root / "scripts" / "quickstart_measures.py")
    qm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qm)
    manifest = json.loads((qm.DEST / qm.MANIFEST).read_text())
    pin = next(line.split("==")[1].strip() for line in (root / "requirements" / "ci.txt").read_text().splitlines()
               if line.startswith("torch=="))
    assert manifest["torch"].split("+")[0] == pin, "keyed with another torch than requirements/ci.txt's: rerun " \
                                                   "scripts/quickstart_measures.py"
    if torch.__version__.split("+")[0] != pin:
        pytest.skip(f"torch {torch.__version__} here: the quick start's measures are keyed with torch {pin}")
    assert manifest["code"] == qm.code_versions(), "stale: rerun scripts/quickstart_measures.py"
    assert manifest["entries"] == sorted(p.name for p in qm.DEST.glob("*.json"))
    assert {e.split("-")[0] for e in manifest["entries"]} == {"eval", "heldout"}
