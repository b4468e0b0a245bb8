"""--device: resolved and checked before any work, models loaded straight onto it, every phase there.

A CPU machine cannot run on a GPU, so the CUDA side is checked by what can be checked here: the
resolution rules with ``torch.cuda`` monkeypatched, the arguments the loading and the Trainer get,
and (on the suite's own device, SALIENTFT_TEST_DEVICE) that no phase computes anywhere else.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from salientft.cli import main
from salientft.config import TrainConfig
from salientft.devices import check_device_spec, describe_device, resolve_device

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as on a machine with two GPUs (nothing is run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for var in ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(var, raising=False)


def test_spellings_and_resolution_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device_spec(" CUDA:1 ") == "cuda:1" and check_device_spec(None) == "auto"
    assert check_device_spec(torch.device("cuda", 3)) == "cuda:3"
    assert resolve_device("auto") == resolve_device(None) == resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "meta", "cuda:", "cuda:-1", "cpu:0", "mps", "", 0):
        with pytest.raises(ValueError, match="is not a device: use auto"):
            resolve_device(bad)
    for absent in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ValueError, match="no CUDA device is available.*--device cpu"):
            resolve_device(absent)


def test_resolution_with_gpus(two_gpus, monkeypatch):
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")  # a GPU in the machine never overrides cpu
    with pytest.raises(ValueError, match="has 2 CUDA devices .*cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    # torchrun: every rank on its LOCAL_RANK GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="LOCAL_RANK .*cuda:1"):
        resolve_device("cuda:0")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # accelerate launch --config_file ddp_cpu.yaml
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cuda") == torch.device("cuda", 1)


def test_device_is_recorded_by_name():
    d = describe_device("cpu")
    assert d["device"] == "cpu" and isinstance(d["name"], str) and d["name"]


def test_train_config_round_trips_the_device_and_checks_its_spelling(tmp_path):
    assert TrainConfig().device == "auto"
    cfg = TrainConfig(device="CUDA:1")  # the spelling only: this machine need not have it
    assert cfg.device == "cuda:1"
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg == TrainConfig.from_json(cfg.to_json())
    with pytest.raises(ValueError, match="TrainConfig.device 'gpu' is not a device"):
        TrainConfig(device="gpu")


def test_a_resume_may_change_the_device():
    from salientft.train import config_changes

    stored = TrainConfig(method="gift-sw", max_steps=10, device="cuda:0").to_dict()
    assert config_changes(stored, TrainConfig(method="gift-sw", max_steps=10, device="cpu")) == []
    older = {k: v for k, v in stored.items() if k != "device"}  # a run stored before the field existed
    assert config_changes(older, TrainConfig(method="gift-sw", max_steps=10, device="cuda")) == []


COMMANDS = {
    "train": ["train", "--model", "tiny-random-llama", "--output", "{out}"],
    "eval": ["eval", "--model", "tiny-random-llama", "--tasks", "piqa", "--limit", "2", "--output", "{out}/r.json"],
    "calibrate": ["calibrate", "--model", "tiny-random-llama", "--output", "{out}/s.safetensors"],
    "quantize": ["quantize", "--model", "tiny-random-llama", "--bits", "4", "--output", "{out}"],
    "export": ["export", "{out}", "--format", "lora", "--output", "{out}/lora"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("device,message", [("gpu", "'gpu' is not a device: use auto"),
                                            ("cuda:7", "cuda:7: ")])
def test_every_command_refuses_a_bad_device_before_any_work(tmp_path, capsys, monkeypatch, command, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    argv = [a.format(out=out) for a in COMMANDS[command]] + ["--device", device]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"salientft {command}: error: --device {message}"), err
    assert not out.exists()  # nothing was written, nothing loaded


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_documents_the_device_flag(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--device" in capsys.readouterr().out


def test_train_config_file_device_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "c.yaml").write_text("model: tiny-random-llama\ndevice: cuda\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "o")]) == 2
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_model_folder_loads_straight_onto_the_device(tmp_path, monkeypatch):
    """from_pretrained gets device_map={"": "cuda:1"} (weights read there, no CPU copy); the CPU loads as before."""
    import transformers

    from salientft import models

    seen = {}

    def fake(path, **kw):
        seen.update(kw)
        return models.tiny_random_llama()

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: models.tiny_tokenizer())
    monkeypatch.setattr(models, "resolve_device", lambda spec: torch.device("cuda", 1))
    models.load_model(str(tmp_path), dtype="fp16", device="cuda:1")
    assert seen["device_map"] == {"": "cuda:1"} and seen["dtype"] == torch.float16
    seen.clear()
    models.load_model(str(tmp_path), device=None)
    assert "device_map" not in seen


def test_loaded_model_is_on_the_requested_device(tmp_path, device):
    from salientft.models import load_model, tiny_random_llama, tiny_tokenizer

    tiny_random_llama(seed=0).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    for name, dtype in (("tiny-random-llama", torch.float32), (str(tmp_path / "m"), torch.bfloat16)):
        model, _ = load_model(name, dtype=dtype, device=str(device))
        placed = {(p.device, p.dtype) for p in model.parameters()} | {(b.device, b.dtype) for b in model.buffers()
                                                                       if b.is_floating_point()}
        assert {d for d, _ in placed} == {device}, name
        assert {t for _, t in placed} <= {dtype, torch.float32}, name  # rotary inv_freq stays fp32


def test_trainer_arguments_follow_the_device(tmp_path, two_gpus, monkeypatch):
    """device cpu: use_cpu even with GPUs in the machine; cuda:1 in one process: exactly that GPU, no DataParallel."""
    from salientft.train import _training_arguments

    set_to = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_to.append(torch.device(d)))
    cpu = _training_arguments(torch.device("cpu"), output_dir=str(tmp_path), report_to="none")
    assert cpu.use_cpu and cpu.device == torch.device("cpu") and cpu.n_gpu == 0
    gpu = _training_arguments(torch.device("cuda", 1), output_dir=str(tmp_path), report_to="none")
    assert not gpu.use_cpu and gpu.device == torch.device("cuda", 1) and gpu.n_gpu == 1
    assert set_to[-1] == torch.device("cuda", 1)
    import pickle  # the Trainer writes the arguments into every checkpoint (training_args.bin)

    assert pickle.loads(pickle.dumps(gpu)).salientft_device == "cuda:1"


def test_the_watch_sees_host_work():
    watch = DeviceWatch(torch.device("meta"))
    with watch:
        torch.ones(4096) * 2
    assert watch.off == ["aten.mul.Tensor -> cpu (4096,)"] or any("cpu" in o for o in watch.off)


class DeviceWatch(TorchDispatchMode):
    """Records every op that produced a tensor of more than ``small`` elements off ``device`` (host work)."""

    ALLOWED = {"aten._to_copy.default", "aten.copy_.default", "aten.lift_fresh.default", "aten._local_scalar_dense.default"}

    def __init__(self, device, small=2048):
        super().__init__()
        self.device, self.small, self.off = device, small, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) not in self.ALLOWED:
            flat = out if isinstance(out, (tuple, list)) else [out]
            for t in flat:
                if (isinstance(t, torch.Tensor) and t.device not in (self.device, torch.device("meta"))
                        and t.numel() > self.small):  # meta: shapes only, no work
                    self.off.append(f"{func} -> {t.device} {tuple(t.shape)}")
        return out


@pytest.mark.numerics
def test_no_phase_computes_off_the_device(device, tiny_tok):
    """Calibration, the metric, GIFT-SW's noise scales and training step, the held-out loss, the
    evaluation and the merge all run on the model's device (host tensors only for small results)."""
    from salientft import apply_gift, merge_gift
    from salientft.calibration import calibration_batches, collect_activation_stats
    from salientft.data.chat import ChatCollator, dataset_from_conversations
    from salientft.evaluation import evaluate
    from salientft.gift import GiftConfig
    from salientft.models import load_model
    from salientft.saliency import saliency_scores
    from salientft.train import heldout_loss

    model, tok = load_model("tiny-random-llama", dtype="fp32", device=str(device))
    batches = calibration_batches(tok, ["some calibration text about cats and dogs " * 8] * 4, 4, 32, 2, 0)
    convs = [[{"role": "user", "content": f"What is {i}?"}, {"role": "assistant", "content": f"{i}."}]
             for i in range(8)]
    ds = dataset_from_conversations(convs, tok, max_length=64)
    watch = DeviceWatch(device)
    with watch:
        stats = collect_activation_stats(model, batches)
        scores = saliency_scores(model, stats, metric="gift", bits=4)
        apply_gift(model, GiftConfig(n_salient=4, noise="weight"), scores)
        model.train()
        ids = torch.randint(3, 200, (2, 16), device=device)
        model(input_ids=ids, labels=ids).loss.backward()
        heldout_loss(model, ds, ChatCollator(tok))
        evaluate(model, tok, ["piqa"], limit=2, progress=False)
        merge_gift(model)
    assert not watch.off, watch.off[:10]


@pytest.mark.parametrize("value,says", [("meta", "'meta' is not a device"), ("auto", "name the device"),
                                        ("cuda:99", "cuda:99: ")])
def test_the_suite_refuses_a_device_it_cannot_use(value, says):
    """SALIENTFT_TEST_DEVICE=meta / auto / an absent GPU: pytest stops before any test, naming the values."""
    env = {**os.environ, "SALIENTFT_TEST_DEVICE": value}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_imports.py")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 4, done.stdout + done.stderr  # pytest's usage error
    err = done.stdout + done.stderr
    assert f"SALIENTFT_TEST_DEVICE={value!r} refused" in err and says in err, err
    assert "set it to cpu (the default), cuda or cuda:N" in err


def test_cpu_only_tests_are_skipped_with_their_reason_on_another_device(tmp_path):
    """With SALIENTFT_TEST_DEVICE=cuda (torch.cuda faked by a plugin loaded before the conftest), a
    cpu_only test is skipped and says why; an unmarked one runs."""
    (tmp_path / "fakecuda.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n"
                                          "torch.cuda.device_count = lambda: 1\n")
    (tmp_path / "test_marked.py").write_text(
        "import pytest\n\n\n@pytest.mark.cpu_only('a CPU kernel')\ndef test_cpu():\n    pass\n\n\n"
        "def test_any(device):\n    assert str(device) == 'cuda:0'\n")
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())  # the suite's own
    env = {**os.environ, "SALIENTFT_TEST_DEVICE": "cuda",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "fakecuda", "-p", "no:cacheprovider",
                           "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
                           str(tmp_path / "test_marked.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "1 passed, 1 skipped" in out and "CPU only (a CPU kernel); SALIENTFT_TEST_DEVICE=cuda:0" in out, out
