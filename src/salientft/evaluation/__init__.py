"""Zero-shot evaluation mirroring lm-evaluation-harness, perplexity, and run comparison."""
from .compare import compare_runs, load_run
from .loading import attach_adapter, load_for_eval
from .perplexity import perplexity
from .runner import evaluate, paper_average, results_markdown
from .tasks import DEFAULT_TASKS, PAPER_METRICS, TASKS, load_items, parse_tasks
from .cli_api import run_eval

__all__ = [
    "evaluate", "perplexity", "compare_runs", "load_run", "load_for_eval", "attach_adapter",
    "results_markdown", "paper_average", "parse_tasks", "load_items", "run_eval",
    "TASKS", "PAPER_METRICS", "DEFAULT_TASKS",
]
