"""Bridge to EleutherAI's lm-evaluation-harness (PyPI `lm-eval`, optional extra `modelpress[lm-eval]`):
run its tasks (hellaswag, arc_easy, ...) on a model modelpress loaded or compressed, in process, through
lm-eval's HFLM wrapper around our model object (no re-loading, so a compressed model is scored exactly
as it runs here). Harness: Gao et al., "A framework for few-shot language model evaluation"
(Zenodo 10.5281/zenodo.5371628).

Datasets come from the Hugging Face hub cache. modelpress opens no connection of its own and changes no
setting inside `datasets` / `huggingface_hub`: for cache-only runs set the documented environment
variables HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 before starting, or use local task folders
(`include_path`, CLI `--tasks-dir`) whose YAMLs read local files. A task folder is code: lm-eval's
`!function` tags import Python modules from it, so it is read only with `trust_code=True`
(CLI `--trust-tasks-code`)."""
from __future__ import annotations

import os

from torch import nn

from ..errors import UserError

INSTALL_HINT = "pip install 'modelpress[lm-eval]' (or pip install lm-eval)"
TASKS_CODE_RISK = ("a task folder is code: lm-eval's `!function` tags import and run Python files from it with "
                   "your permissions; pass --trust-tasks-code (API: trust_code=True) only for folders you wrote "
                   "or fully trust")


def _offline_env() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def parse_tasks(spec: str | list[str]) -> list[str]:
    tasks = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty: pass lm-eval task names, e.g. --tasks hellaswag,arc_easy")
    return tasks


def run_tasks(model: nn.Module, tokenizer, tasks: str | list[str], limit: int | float | None = None,
              num_fewshot: int | None = None, batch_size: int = 1, include_path: str | None = None,
              include_defaults: bool = True, trust_code: bool = False, seed: int = 0) -> dict:
    """Run lm-eval tasks on an in-memory causal LM; returns {task: {metric: value}} (stderr keys
    dropped). `limit` caps the documents per task (int) or a fraction (float < 1); `include_path` adds
    a folder of task YAMLs, which is code (see the module docstring): refused unless `trust_code=True`.

    >>> model, tok = modelpress.load("out/smollm2-w4")
    >>> run_tasks(model, tok, "hellaswag,arc_easy", limit=100)["arc_easy"]["acc,none"]
    """
    if include_path is not None:
        if not trust_code:
            raise UserError(f"--tasks-dir {include_path}: {TASKS_CODE_RISK}")
        if not os.path.isdir(include_path):
            raise UserError(f"--tasks-dir {include_path} is not a folder: pass a folder of lm-eval task YAMLs")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(f"lm-eval is not installed, so --tasks cannot run: {INSTALL_HINT}") from None
    names = parse_tasks(tasks)
    if limit is not None and limit >= 1:
        limit = int(limit)
    if tokenizer is None:
        raise UserError("lm-eval tasks need the model's tokenizer, but the model folder has none: export it with its tokenizer")
    offline = _offline_env()
    device = str(next(model.parameters()).device)
    tm = TaskManager(include_path=include_path, include_defaults=include_defaults)
    try:
        loaded = tm.load(names)
    except KeyError as e:
        raise UserError(f"unknown lm-eval task: {str(e).strip(chr(34))} (list them with `lm-eval ls tasks`)") from None
    except (ConnectionError, OSError, ValueError) as e:
        where = "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set)" if offline else "from the hub"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"the datasets for lm-eval tasks {','.join(names)} are not available {where}: {first}; "
                        "download them once on a machine with hub access into the HF cache "
                        "(HF_HOME / HF_DATASETS_CACHE) and copy that cache here") from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(loaded["tasks"].values()), limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    return {task: {k: v for k, v in metrics.items() if "stderr" not in k and k != "alias"}
            for task, metrics in res["results"].items()}


def print_results(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table("task", "metric", "value")
    for task, metrics in results.items():
        for k, v in metrics.items():
            t.add_row(task, k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(t)
