"""What a command will need that this environment lacks, found before any work and reported at once.

:func:`missing_for` reads a command's settings (the model, the data, the method, the tasks, the
plot, ...) and lists every optional package and every embedded file set the run will ask for
and cannot find; :func:`require` raises one error naming all of them with the commands that
install them. Nothing heavy is imported: modules are looked up with ``importlib.util.find_spec``
and the embedded files in salientft's cache (or an installed data package).

Optional packages come with salientft's extras (``pip install 'salientft[embedded]'``:
gguf and pyarrow); the embedded model and data files are not pip-installable with salientft and
come from ``salientft fetch-embedded``.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ._io import is_path_like
from .config_base import STATLESS_METRICS
from ._packages import FETCH_COMMAND, locate
from .embedded_files import DATA_FILES, EMBEDDED_MODEL, GGUF_NAME, MODEL_FILES, converted_model_dir

# The extra of salientft that installs each optional module.
EXTRAS = {
    "gguf": "embedded",
    "pyarrow": "embedded",
    "peft": "peft",
    "matplotlib": "plots",
    "datasets": "data",
    "lm_eval": "lmeval",
    "tensorboard": "tensorboard",
}
PLOTS_INSTALL = "pip install 'salientft[plots]'"
# The experiment trackers the Trainer knows (transformers' INTEGRATION_TO_CALLBACK; a test keeps the
# two equal): name -> (the module it imports, the package that provides it; None: nothing to install).
# Only these names are suggested for installation: a typo is never turned into a pip command.
TRACKERS = {
    "azure_ml": ("azureml.core", "azureml-core"),
    "clearml": ("clearml", "clearml"),
    "codecarbon": ("codecarbon", "codecarbon"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "dagshub": ("dagshub", "dagshub"),
    "dvclive": ("dvclive", "dvclive"),
    "flyte": ("flytekit", "flytekit"),
    "kubeflow": (None, None),
    "mlflow": ("mlflow", "mlflow"),
    "neptune": ("neptune", "neptune"),
    "swanlab": ("swanlab", "swanlab"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "trackio": ("trackio", "trackio"),
    "wandb": ("wandb", "wandb"),
}
# --report-to values that name no tracker: "none" (the default) and "all" (every installed one).
TRACKER_WORDS = ("none", "all")
COMMANDS = ("train", "calibrate", "quantize", "eval", "compare")


@dataclass(frozen=True)
class Requirement:
    """One missing thing: ``name``, the setting that needs it (``reason``), how to get it."""

    name: str
    reason: str
    extra: str | None = None  # the salientft extra that pip-installs it
    command: str | None = None  # else the command that provides it

    @property
    def install(self) -> str:
        return f"pip install 'salientft[{self.extra}]'" if self.extra else (self.command or "")


class MissingRequirements(ImportError):
    """Everything a command needs and lacks, in one message with the install commands."""

    def __init__(self, command: str, missing: list[Requirement]):
        self.command = command
        self.missing = list(missing)
        super().__init__(format_missing(command, self.missing))


def module_available(name: str) -> bool:
    """True when ``import name`` would find the module (``find_spec``: nothing is imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package; a module without __spec__
        return False


def _module(name: str, reason: str, extra: str | None = None) -> list[Requirement]:
    return [] if module_available(name) else [Requirement(name, reason, extra=extra or EXTRAS[name])]


def _files(pkg, reason: str, check=None) -> list[Requirement]:
    folder = locate(pkg.module, pkg.requirement)
    if folder is not None and (check is None or check(folder)):
        return []
    return [Requirement(f"{pkg.what} files (from the {pkg.requirement} wheel)", reason, command=FETCH_COMMAND)]


def _model_needs(model, reason: str) -> list[Requirement]:
    """The embedded preset needs gguf and the GGUF file, until its converted copy is cached."""
    if model != EMBEDDED_MODEL or (converted_model_dir() / "config.json").is_file():
        return []
    return _module("gguf", reason) + _files(MODEL_FILES, reason, lambda d: (d / GGUF_NAME).is_file())


def _embedded_data(reason: str) -> list[Requirement]:
    return _module("pyarrow", reason) + _files(DATA_FILES, reason, lambda d: (d / "hf_datasets").is_dir())


def _data_needs(data, reason: str) -> list[Requirement]:
    """'embedded': pyarrow + the data files; a file: nothing; else a Hugging Face dataset name."""
    if data is None or not isinstance(data, str):
        return []
    if data == "embedded":
        return _embedded_data(reason)
    if not data.startswith("hf:") and is_path_like(data):
        return []  # a local file (read_jsonl / load_documents refuse one they cannot read)
    return _module("datasets", reason)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _needs_peft(adapter: Path) -> bool:
    """A PEFT adapter other than GIFT-SW (salientft reads GIFT-SW adapters itself, PEFT or not)."""
    from .adapter_format import PEFT_OTHER, adapter_kind

    try:
        return adapter_kind(adapter).kind == PEFT_OTHER
    except (OSError, ValueError):
        return False  # the command itself reports a missing or corrupt adapter


def _train(s: dict) -> list[Requirement]:
    out = []
    if not s.get("quantized"):
        out += _model_needs(s.get("model"), f"--model {s.get('model')}")
    out += _data_needs(s.get("data"), f"--data {s.get('data')}")
    for module in _method_modules(s, s.get("method"), bool(s.get("quantized"))):
        out += _module(module, f"--method {s['method']}")
    if s.get("eval_tasks"):
        out += _embedded_data(f"--eval-tasks {s['eval_tasks']}")
    return out + _trackers(s.get("report_to"))


def tracker_names(report_to) -> list[str]:
    """The tracker names of ``--report-to`` (comma-separated), each checked against :data:`TRACKERS`;
    an unknown name is a ValueError naming the nearest valid one (never an install command)."""
    import difflib

    names = [n.strip() for n in str(report_to or "none").split(",") if n.strip()]
    valid = sorted(TRACKERS) + list(TRACKER_WORDS)
    for name in names:
        if name not in valid:
            near = difflib.get_close_matches(name.lower(), valid, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"--report-to: unknown tracker {name!r}; {hint}valid: {', '.join(valid)}")
    if len(names) > 1 and set(names) & set(TRACKER_WORDS):
        raise ValueError(f"--report-to {report_to}: 'none' and 'all' stand alone, not in a list of trackers")
    return [n for n in names if n not in TRACKER_WORDS]


def _trackers(report_to) -> list[Requirement]:
    """The experiment trackers of ``--report-to`` (the Trainer imports them when training starts);
    only known trackers (:data:`TRACKERS`) get an install command; unknown names are refused by
    :func:`tracker_names` (TrainConfig does it first)."""
    out = []
    try:
        names = tracker_names(report_to)
    except ValueError:
        return out  # TrainConfig reports it
    for name in names:
        module, package = TRACKERS[name]
        if module is not None and not module_available(module):
            extra = EXTRAS.get(name)
            out.append(Requirement(name, f"--report-to {report_to}", extra=extra,
                                   command=None if extra else f"pip install {package}"))
    return out


def _calibration(s: dict, command: str) -> list[Requirement]:
    out = []
    if s.get("model") is not None:
        out += _model_needs(s["model"], f"--model {s['model']}")
    if command == "quantize" or s.get("metric") not in STATLESS_METRICS:
        out += _data_needs(s.get("data"), f"--data {s.get('data')}")
    return out + _plot(s)


def _eval(s: dict) -> list[Requirement]:
    out = []
    model = s.get("model")
    if isinstance(model, str):
        run = _read_json(Path(model) / "run_config.json") if Path(model).is_dir() else {}
        if run:  # a finished run: its base model, and PEFT for a LoRA/DoRA adapter
            if not run.get("quantized"):
                out += _model_needs(run.get("model"), f"--model {model} (base {run.get('model')})")
            for module in _method_modules(s, run.get("method"), bool(run.get("quantized"))):
                out += _module(module, f"--model {model} (a {run['method']} run)")
        else:
            out += _model_needs(model, f"--model {model}")
    adapter = s.get("adapter")
    if adapter and _needs_peft(Path(adapter)):
        out += _module("peft", f"--adapter {adapter} (a PEFT adapter)")
    if s.get("tasks"):
        out += _embedded_data(f"--tasks {s['tasks']}")
        if s.get("backend") == "lm-eval":
            out += _module("lm_eval", "--backend lm-eval") + _module("datasets", "--backend lm-eval", "lmeval")
    if s.get("perplexity") == "heldout":
        out += _embedded_data("--perplexity heldout")
    return out


def _method_modules(s: dict, name, quantized: bool) -> tuple[str, ...]:
    """The modules a training method imports, asked of the caller's ``method_modules(name, quantized)``
    (the CLI passes the methods registry's answer; this bottom-layer module cannot import it)."""
    ask = s.get("method_modules")
    if not name or ask is None:
        return ()
    try:
        return tuple(ask(name, quantized))
    except ValueError:  # an unknown method: TrainConfig reports it
        return ()


def _plot(s: dict) -> list[Requirement]:
    return _module("matplotlib", f"--plot {s['plot']}") if s.get("plot") else []


def missing_for(command: str, /, **settings) -> list[Requirement]:
    """Everything ``salientft <command>`` with these settings needs and cannot find (empty: all there).

    ``settings`` are the command's flags by their field names (model, data, method, eval_tasks,
    quantized, metric, tasks, backend, perplexity, adapter, plot; others are ignored, and an
    absent setting is not checked), plus ``method_modules``: a function (method name, quantized)
    -> the modules that method imports (``salientft.methods.get(...).requires``). Each missing package or file set is listed once, with the
    first setting that needs it.
    """
    if command == "train":
        found = _train(settings)
    elif command in ("calibrate", "quantize"):
        found = _calibration(settings, command)
    elif command == "eval":
        found = _eval(settings)
    elif command == "compare":
        found = _plot(settings)
    else:
        raise ValueError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    seen, out = set(), []
    for r in found:
        if r.name not in seen:
            seen.add(r.name)
            out.append(r)
    return out


def install_commands(missing: list[Requirement]) -> list[str]:
    """The commands that provide ``missing``: one ``pip install 'salientft[a,b]'``, then the others."""
    extras = list(dict.fromkeys(r.extra for r in missing if r.extra))
    others = list(dict.fromkeys(r.command for r in missing if not r.extra and r.command))
    return ([f"pip install 'salientft[{','.join(extras)}]'"] if extras else []) + others


def format_missing(command: str, missing: list[Requirement]) -> str:
    lines = [f"`salientft {command}` with these settings needs what is not installed:"]
    lines += [f"  - {r.name} (for {r.reason})" for r in missing]
    lines.append("install with:")
    lines += [f"  {c}" for c in install_commands(missing)]
    if any(r.command == FETCH_COMMAND for r in missing):
        lines.append(f"(`{FETCH_COMMAND}` downloads the pinned wheels from PyPI and copies only their model/data "
                     "files into salientft's cache;\n `pip install 'salientft[embedded]'` installs the Python "
                     "packages that read them: gguf and pyarrow)")
    return "\n".join(lines)


def require(command: str, /, **settings) -> None:
    """Raise :class:`MissingRequirements` (an ImportError) naming everything missing at once."""
    missing = missing_for(command, **settings)
    if missing:
        raise MissingRequirements(command, missing)


__all__ = ["Requirement", "MissingRequirements", "missing_for", "require", "install_commands",
           "format_missing", "module_available", "PLOTS_INSTALL", "EXTRAS", "TRACKERS", "tracker_names"]
