"""Block-by-block (sequential) calibration and quantization: a model opened with its decoder
blocks left on disk, one block read at a time, gives the all-at-once results bit for bit (fp32,
CPU) within a bounded memory (docs/quantization.md#block-by-block)."""
import gc
import json

import pytest
import torch

from salientft.calibration import (HostBlocks, collect_activation_stats, load_stats,
                                   sequential_activation_stats)
from salientft.models import DiskBlocks, open_blockwise, tiny_random_llama, tiny_tokenizer
from salientft.pipelines import calibrate, open_model
from salientft.quant.layer import QuantizedSalientLinear
from salientft.quant.model import quantize, quantized_layers

pytestmark = pytest.mark.cpu_only("compares the CPU's fp32 results bit for bit and measures host memory")


def _save(tmp_path, n_layers=3, tie=True, **kw):
    model = tiny_random_llama(seed=0, num_hidden_layers=n_layers, tie_word_embeddings=tie, **kw)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model, folder


def _batches(seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # padding excluded the same way in both paths
    return [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]


def _assert_same_stats(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for field in ("max_abs", "sum_sq", "sum_abs", "hessian"):
            x, y = getattr(a[name], field), getattr(b[name], field)
            assert (x is None and y is None) or torch.equal(x, y), (name, field)
        assert a[name].count == b[name].count


@pytest.mark.numerics
def test_blockwise_statistics_equal_the_full_forward_pass(tmp_path):
    model, folder = _save(tmp_path)
    ref = collect_activation_stats(model, _batches(), hessian=True, progress=False)
    _assert_same_stats(ref, sequential_activation_stats(model, _batches(), hessian=True, progress=False))
    lazy, _, blocks = open_blockwise(str(folder), dtype="fp32")
    assert isinstance(blocks, DiskBlocks)
    assert all(p.device.type == "meta" for p in lazy.model.layers.parameters())  # nothing of the blocks read
    _assert_same_stats(ref, sequential_activation_stats(lazy, _batches(), hessian=True, progress=False, blocks=blocks))
    assert blocks.loaded_bytes == 0  # every block released (back to meta)


@pytest.mark.numerics
@pytest.mark.parametrize("metric", ["gift", "magnitude"])
def test_blockwise_calibrate_writes_the_same_scores_and_statistics(tmp_path, metric):
    model, folder = _save(tmp_path)
    tok = tiny_tokenizer()
    texts = [f"calibration text number {i}: the quick brown fox jumps over the lazy dog." for i in range(12)]
    common = dict(metric=metric, calib_samples=4, seq_len=16, batch_size=2, progress=False)
    ref = calibrate(model, tok, texts, stats_output=tmp_path / "a.safetensors", **common)
    lazy, _, blocks = open_model(str(folder), dtype="fp32", device="cpu", sequential=True)
    got = calibrate(lazy, tok, texts, stats_output=tmp_path / "b.safetensors", blocks=blocks, **common)
    assert ref.keys() == got.keys() and len(ref) == 21
    assert all(torch.equal(ref[n], got[n]) for n in ref)
    if metric == "gift":
        _assert_same_stats(load_stats(tmp_path / "a.safetensors"), load_stats(tmp_path / "b.safetensors"))


def _live_bytes() -> int:
    """Bytes of every tensor storage alive in the process (meta tensors hold none), each once."""
    seen, total = set(), 0
    for o in gc.get_objects():
        if issubclass(type(o), torch.Tensor) and o.device.type != "meta":  # type(): no __class__ lookups
            st = o.untyped_storage()
            if st.data_ptr() and st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


@pytest.mark.numerics
def test_blockwise_quantize_from_disk_equals_in_memory_within_two_blocks(tmp_path, monkeypatch):
    n_layers = 4
    model, folder = _save(tmp_path, n_layers=n_layers, vocab_size=64)
    block_bytes = sum(t.numel() * t.element_size() for t in model.model.layers[0].state_dict().values())
    quantize(model, 3, n_salient=4, calibration=_batches(vocab=64), progress=False)

    lazy, _, blocks = open_blockwise(str(folder), dtype="fp32")
    batches = _batches(vocab=64)
    gc.collect()
    base = _live_bytes()  # the modules outside the blocks, the calibration ids: the fixed part
    peaks = []

    def probe():
        gc.collect()
        quantized = sum(m.storage_bytes() for m in lazy.modules() if isinstance(m, QuantizedSalientLinear))
        peaks.append((_live_bytes() - base, quantized))

    load, release = DiskBlocks.load, DiskBlocks.release

    def load_and_probe(self, i):
        block = load(self, i)
        probe()
        return block

    def probe_and_release(self, i, block, keep=True):
        probe()  # quantized, with the calibration activations of the next block alive
        release(self, i, block, keep)

    monkeypatch.setattr(DiskBlocks, "load", load_and_probe)
    monkeypatch.setattr(DiskBlocks, "release", probe_and_release)
    import salientft.quant.model as qm

    gptq = qm.gptq_quantize

    def gptq_and_probe(W, H, *args, **kw):
        if W.shape[1] == 128:  # down_proj, the block's last layer: the largest Hessian
            probe()
        return gptq(W, H, *args, **kw)

    monkeypatch.setattr(qm, "gptq_quantize", gptq_and_probe)
    quantize(lazy, 3, n_salient=4, calibration=batches, progress=False, blocks=blocks)

    # Bound: two dense fp32 blocks (the block being quantized; its statistics, Hessians and the
    # calibration activations fit in the second) plus the quantized output so far. The whole
    # model would hold four dense blocks.
    assert len(peaks) == 3 * n_layers
    for extra, quantized in peaks:
        assert extra <= 2 * block_bytes + quantized, (extra, block_bytes, quantized)
    assert max(e for e, _ in peaks) > 0.5 * block_bytes  # the probe does see a loaded block
    assert blocks.peak_loaded_bytes <= block_bytes

    ref, got = model.state_dict(), lazy.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert len(quantized_layers(lazy)) == 7 * n_layers


@pytest.mark.numerics
def test_host_memory_fallback_when_the_files_use_other_names(tmp_path, caplog):
    """A checkpoint whose tensor names are not the model's (transformers converts it on load): the
    model is loaded in host memory and each block moved to the device for its turn."""
    from safetensors.torch import load_file, save_file

    model, folder = _save(tmp_path)
    f = folder / "model.safetensors"
    tensors = load_file(f)
    tensors["model.norm.gamma"] = tensors.pop("model.norm.weight")
    save_file(tensors, f, metadata={"format": "pt"})
    lazy, _, blocks = open_blockwise(str(folder), dtype="fp32")
    assert isinstance(blocks, HostBlocks) and "not stored under the model's names" in caplog.text
    ref = collect_activation_stats(model, _batches(), hessian=True, progress=False)
    # the renamed norm is re-initialised by transformers (not in the blocks): the blocks' statistics match
    _assert_same_stats(ref, sequential_activation_stats(lazy, _batches(), hessian=True, progress=False, blocks=blocks))


def test_open_model_goes_blockwise_when_the_weights_do_not_fit(tmp_path, monkeypatch):
    import salientft.models as models

    _, folder = _save(tmp_path)
    model, _, blocks = open_model(str(folder), dtype="fp32", device="cpu")
    assert blocks is None  # fits
    monkeypatch.setattr(models, "free_memory", lambda device: 1000)
    model, _, blocks = open_model(str(folder), dtype="fp32", device="cpu")
    assert isinstance(blocks, DiskBlocks)


def test_cli_sequential_quantize_writes_the_same_model(tmp_path, capsys):
    from safetensors.torch import load_file

    from salientft.cli import main

    _, folder = _save(tmp_path, vocab_size=300)
    outs = {}
    for flag in ([], ["--sequential"]):
        out = tmp_path / ("seq" if flag else "whole")
        rc = main(["quantize", "--model", str(folder), "--bits", "4", "--n-salient", "4", "--dtype", "fp32",
                   "--calib-samples", "4", "--seq-len", "16", "--output", str(out), "--no-progress", "--device", "cpu",
                   *flag])
        assert rc == 0
        outs[bool(flag)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        outs[str(bool(flag))] = load_file(out / "model.safetensors")
    assert outs[True]["blockwise"] and not outs[False]["blockwise"]
    assert outs[True]["before"] == outs[False]["before"] and outs[True]["after"] == outs[False]["after"]
    a, b = outs["False"], outs["True"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.numerics
def test_blockwise_statistics_of_gpt2_blocks_called_with_positional_arguments(tiny_gpt2):
    """GPT-2's model hands its blocks more than the hidden states positionally (and Conv1D layers)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    ref = collect_activation_stats(tiny_gpt2, batches, hessian=True, progress=False)
    _assert_same_stats(ref, sequential_activation_stats(tiny_gpt2, batches, hessian=True, progress=False))
    assert len(ref) == 8


# ----------------------------------------------------------------------------- GIFT-SW's calibration in train

def _gift_data(n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 200, (16,), generator=g).tolist()} for _ in range(n)]


@pytest.mark.numerics
def test_gift_sw_sequential_calibration_gives_the_all_at_once_scores(monkeypatch):
    """GIFT-SW's preparation with ``sequential_calibration`` scores one block at a time (the
    sequential statistics path) and gets the all-at-once scores bit for bit (fp32, CPU), hence
    the same salient columns and noise scales."""
    from salientft import methods
    from salientft.config import TrainConfig
    from salientft.gift import gift_layers
    from salientft.methods import gift_sw

    seen = {}
    plain = gift_sw.gift_scores

    def spy(model, gcfg, batches, blocks=None):
        out = plain(model, gcfg, batches, blocks)
        seen[blocks is not None] = {k: v.clone() for k, v in out.items()}
        return out

    monkeypatch.setattr(gift_sw, "gift_scores", spy)
    prepared = {}
    for sequential in (False, True):
        cfg = TrainConfig(method="gift-sw", model="tiny-random-llama", metric="gift", n_salient=4, dtype="fp32",
                          calib_samples=8, device="cpu", sequential_calibration=sequential)
        model = methods.get("gift-sw").prepare(tiny_random_llama(seed=0).train(), cfg, _gift_data())
        prepared[sequential] = {n: (m.salient_idx.clone(), m.noise_std.clone()) for n, m in gift_layers(model).items()}
    assert seen.keys() == {False, True}  # each path ran once
    a, b = seen[False], seen[True]
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert prepared[False].keys() == prepared[True].keys()
    assert all(torch.equal(x, y) for n in prepared[False] for x, y in zip(prepared[False][n], prepared[True][n]))


@pytest.mark.numerics
def test_gift_scores_from_host_or_disk_blocks_equal_the_all_at_once_scores(tmp_path):
    """The block sources GIFT-SW's calibration takes: blocks in host memory (``HostBlocks``) and
    blocks read from disk (a model opened lazily, ``DiskBlocks``) give the all-at-once scores."""
    from salientft.data.chat import calibration_batches_from_dataset
    from salientft.gift import GiftConfig
    from salientft.gift.model import gift_scores

    model, folder = _save(tmp_path)
    gcfg = GiftConfig(n_salient=4, metric="gift")
    batches = calibration_batches_from_dataset(_gift_data(), calib_samples=8, batch_size=4, seed=0)
    ref = gift_scores(model, gcfg, batches)
    host = gift_scores(model, gcfg, batches, blocks=HostBlocks(model.model.layers, "cpu"))
    lazy, _, blocks = open_blockwise(str(folder), dtype="fp32")
    disk = gift_scores(lazy, gcfg, batches, blocks=blocks)
    assert ref and ref.keys() == host.keys() == disk.keys()
    assert all(torch.equal(ref[k], host[k]) and torch.equal(ref[k], disk[k]) for k in ref)


def test_gift_sw_calibrates_block_by_block_when_the_base_does_not_fit(tmp_path, monkeypatch):
    """Unset, ``sequential_calibration`` follows calibrate/quantize's rule (``models.needs_blockwise``):
    a base that does not fit the run's device is loaded in host memory and calibrated block by
    block on the run's device; one that fits goes to the device, calibrated all at once."""
    import salientft.models as models
    from salientft import methods
    from salientft.config import TrainConfig
    from salientft.methods import gift_sw

    _, folder = _save(tmp_path)
    method = methods.get("gift-sw")
    gpu = torch.device("cuda", 0)  # only compared: free_memory is patched, nothing runs there
    cfg = TrainConfig(method="gift-sw", model=str(folder), metric="gift", n_salient=4, dtype="fp32")
    monkeypatch.setattr(models, "free_memory", lambda device: 10**12)
    assert method.base_device(cfg, gpu) == gpu
    monkeypatch.setattr(models, "free_memory", lambda device: 1000)
    assert method.base_device(cfg, gpu) == torch.device("cpu")
    forced = TrainConfig(method="gift-sw", model=str(folder), metric="gift", n_salient=4, dtype="fp32",
                         sequential_calibration=False)
    assert method.base_device(forced, gpu) == gpu  # asked all at once: the rule is not consulted
    # in prepare, the same rule on the model in memory: a base in host memory that does not fit the run's
    # GPU is calibrated block by block there; one that fits (an API caller's model on the CPU) as before
    monkeypatch.setattr(gift_sw, "resolve_device", lambda spec: gpu)
    host_model = tiny_random_llama(seed=0)
    assert gift_sw._calibration_device(host_model, cfg) == (gpu, True)
    assert gift_sw._calibration_device(host_model, forced) == (torch.device("cpu"), False)
    monkeypatch.setattr(models, "free_memory", lambda device: 10**12)
    assert gift_sw._calibration_device(host_model, cfg) == (torch.device("cpu"), False)
    asked = TrainConfig(method="gift-sw", model=str(folder), metric="gift", n_salient=4, sequential_calibration=True)
    assert gift_sw._calibration_device(host_model, asked) == (gpu, True)


def test_sequential_calibration_flag_and_config(tmp_path):
    """``--sequential-calibration`` / ``--no-sequential-calibration`` (unset: automatic) is a
    generated ``salientft train`` flag and a validated TrainConfig setting of GIFT-SW's methods."""
    from salientft.cli import _build_parser
    from salientft.config import TrainConfig

    parse = _build_parser().parse_args
    assert vars(parse(["train", "--sequential-calibration"]))["sequential_calibration"] is True
    assert vars(parse(["train", "--no-sequential-calibration"]))["sequential_calibration"] is False
    assert "sequential_calibration" not in vars(parse(["train"]))  # unset: the YAML's value, else automatic
    assert TrainConfig(method="gift-sw").method_config.sequential_calibration is None
    assert TrainConfig(method="salient", sequential_calibration="yes").method_config.sequential_calibration is True
    with pytest.raises(ValueError, match="sequential_calibration"):
        TrainConfig(method="gift-sw", sequential_calibration="sometimes")
    with pytest.raises(ValueError, match="sequential_calibration|sequential-calibration"):
        TrainConfig(method="lora", sequential_calibration=True)  # a setting LoRA does not read
    # how the scores are computed, not what they are: a resume may change it (as the device)
    from salientft.train import config_changes

    stored = TrainConfig(method="gift-sw", sequential_calibration=True).to_dict()
    assert config_changes(stored, TrainConfig(method="gift-sw", sequential_calibration=False)) == []


def test_train_with_sequential_calibration(tmp_path, monkeypatch):
    """``salientft train --sequential-calibration``: the run asks the method where to load the base
    (``Method.base_device``: host memory) and calibrates block by block, then trains."""
    from salientft.cli import main
    from salientft.methods import gift_sw

    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(16)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    asked, blocked = [], []
    base_device, scores = gift_sw.GiftSW.base_device, gift_sw.gift_scores
    monkeypatch.setattr(gift_sw.GiftSW, "base_device",
                        lambda self, config, device: asked.append(device) or base_device(self, config, device))
    monkeypatch.setattr(gift_sw, "gift_scores",
                        lambda model, gcfg, batches, blocks=None: blocked.append(blocks) or scores(model, gcfg, batches,
                                                                                                   blocks))
    rc = main(["train", "--model", "tiny-random-llama", "--data", str(data), "--output", str(tmp_path / "run"),
               "--method", "gift-sw", "--metric", "gift", "--calib-samples", "8", "--n-salient", "4",
               "--max-steps", "1", "--batch-size", "2", "--max-length", "64", "--dtype", "fp32",
               "--no-eval-before", "--device", "cpu", "--sequential-calibration"])
    assert rc == 0 and (tmp_path / "run" / "adapter").is_dir()
    assert asked == [torch.device("cpu")]
    assert len(blocked) == 1 and blocked[0] is not None
