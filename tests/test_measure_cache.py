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


def per_tensor_fingerprint(model) -> str:
    """The fingerprint as first written (one host copy per tensor): the shipped entries' keys."""
    import hashlib

    h = hashlib.sha256(type(model).__name__.encode())
    fields = {k: v for k, v in model.config.to_dict().items() if k not in cache.WHERE_FROM}
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    seen = set()
    for name, t in sorted(list(model.named_parameters()) + list(model.named_buffers()), key=lambda kv: kv[0]):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:
            h.update(b"tied")
            continue
        seen.add(key)
        h.update(t.contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def test_staged_hashing_is_the_per_tensor_digest_in_few_transfers(tiny_model, monkeypatch):
    """Weights on an accelerator reach the host packed in a staging buffer: the digest is the
    per-tensor one (old keys still found) whatever the buffer's size, tensors split across buffers
    included, and the transfers are one per buffer filled, not one per tensor. The staging path is
    forced on the CPU here (``stage_host``)."""
    streams = []
    real = cache._Stream

    def spy(*a, **kw):
        streams.append(real(*a, **kw))
        return streams[-1]

    monkeypatch.setattr(cache, "_Stream", spy)
    tiny_model.lm_head.weight = tiny_model.model.embed_tokens.weight  # tied: hashed once, named twice
    ref = per_tensor_fingerprint(tiny_model)
    assert cache.model_fingerprint(tiny_model) == ref and streams[-1].transfers == 0  # host: read in place
    tensors = [t for _, t in cache._tensors(tiny_model) if t is not None]
    total = sum(t.numel() * t.element_size() for t in tensors)
    assert len(tensors) > 10
    for chunk in (total, total // 3 + 1, 1000):  # one buffer; three; tensors cut across many
        assert cache.model_fingerprint(tiny_model, chunk_bytes=chunk, stage_host=True) == ref
        assert streams[-1].transfers == -(-total // chunk)
    real_empty = torch.empty

    def full_device(size, **kw):  # no room for a third of the model: smaller buffers, more transfers
        if size > total // 3:
            raise torch.OutOfMemoryError("full")
        return real_empty(size, **kw)

    monkeypatch.setattr(torch, "empty", full_device)
    monkeypatch.setattr(cache, "MIN_STAGING", 1000)
    assert cache.model_fingerprint(tiny_model, chunk_bytes=total, stage_host=True) == ref
    assert streams[-1].transfers == -(-total // (total // 4))
    monkeypatch.setattr(cache, "MIN_STAGING", total)  # the floor reached: the device's error stands
    with pytest.raises(torch.OutOfMemoryError):
        cache.model_fingerprint(tiny_model, chunk_bytes=total, stage_host=True)
    monkeypatch.setattr(torch, "empty", real_empty)
    with torch.no_grad():
        tiny_model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1
    assert cache.model_fingerprint(tiny_model, chunk_bytes=1000, stage_host=True) == per_tensor_fingerprint(tiny_model) != ref


def test_weights_are_read_only_when_an_entry_could_match(measure_cache, tiny_model, monkeypatch):
    """The weights' bytes (the costly part of a key) are read at most once per fingerprint object,
    and before measuring only when an entry with the same cheap probe (settings, code, the model's
    class, config, tensor names, dtypes, shapes) exists; a single changed weight still misses."""
    events = []
    real = cache.model_fingerprint
    monkeypatch.setattr(cache, "model_fingerprint", lambda m, **kw: events.append("weights") or real(m, **kw))

    def measure(v):
        return lambda: events.append("measure") or v

    fp = cache.ModelFingerprint(tiny_model)
    assert cache.cached("eval", {"model": fp, "limit": 2}, measure(1)) == (1, False)
    assert events == ["measure", "weights"]  # nothing could match: measured first, read to key the entry
    assert cache.cached("heldout", {"model": fp, "examples": "x"}, measure(2)) == (2, False)
    assert events == ["measure", "weights", "measure"]  # the same run's other measure: not read again
    [entry] = measure_cache.glob("eval-*.json")
    assert entry.name == f"eval-{cache.probe_for('eval', {'model': fp, 'limit': 2})}-{cache.key_for('eval', {'model': fp, 'limit': 2})}.json"

    def run(fields, v):
        events.clear()
        return cache.cached("eval", {"model": cache.ModelFingerprint(tiny_model), **fields}, measure(v))

    assert run({"limit": 3}, 3) == (3, False) and events == ["measure", "weights"]  # another setting
    assert run({"limit": 2}, 4) == (1, True) and events == ["weights"]  # a possible match: read once, a hit
    with torch.no_grad():
        w = tiny_model.model.layers[1].mlp.down_proj.weight
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(float("inf")))  # one ulp: the same probe
    assert run({"limit": 2}, 5) == (5, False) and events == ["weights", "measure"]
    assert run({"limit": 2}, 6) == (5, True) and events == ["weights"]


def test_format_1_entries_are_ignored_never_misread(measure_cache, tiny_model):
    """A file of the layout before the probe (``<kind>-<key>.json``, format 1), even of the very
    same key, is measured again."""
    fields = {"model": cache.ModelFingerprint(tiny_model), "limit": 2}
    key = cache.key_for("eval", fields)
    measure_cache.mkdir(parents=True)
    (measure_cache / f"eval-{key}.json").write_text(json.dumps({"format": 1, "key": key, "kind": "eval", "value": 9}))
    assert cache.cached("eval", fields, lambda: 1) == (1, False)
    assert cache.cached("eval", fields, lambda: 2) == (1, True)


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
    reads = []  # the weights' bytes are read once per run, for both measures
    real_fp = cache.model_fingerprint
    monkeypatch.setattr(cache, "model_fingerprint", lambda m, **kw: reads.append(1) or real_fp(m, **kw))
    cfg = tiny_config(tmp_path, eval_limit=2)
    first = train_mod.train(cfg)
    assert len(reads) == 1
    before_file = (Path(cfg.output) / "eval_before.json").read_text()
    samples = (Path(cfg.output) / "eval_before.samples.jsonl").read_text()
    assert len(calls) == 2 and not first["eval_before"].get("from_cache")
    assert {p.name.split("-")[0] for p in measure_cache.iterdir()} == {"eval", "heldout"}
    second = train_mod.train(cfg, overwrite=True)
    assert len(calls) == 3  # only "after" evaluated
    assert len(reads) == 2
    assert second["eval_before"]["from_cache"] is True
    assert second["eval_before"]["results"] == first["eval_before"]["results"]
    assert second["heldout_loss_before"] == first["heldout_loss_before"]  # bit for bit
    assert (Path(cfg.output) / "eval_before.samples.jsonl").read_text() == samples
    assert json.loads((Path(cfg.output) / "eval_before.json").read_text())["results"] == json.loads(before_file)["results"]
    # another limit is another measurement
    train_mod.train(tiny_config(tmp_path, eval_limit=3), overwrite=True)
    assert calls[-2:] == [3, 3]
    assert len(reads) == 3


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
    for name in manifest["entries"]:  # in the current layout, else never read
        entry = json.loads((qm.DEST / name).read_text())
        assert entry["format"] == cache.FORMAT and name == f"{entry['kind']}-{entry['probe']}-{entry['key']}.json", \
            f"{name}: an older layout: rerun scripts/quickstart_measures.py"
