"""Recipe sweeps: many recipes x calibration seeds over one model, each job a full `run_recipe`
(load, calibrate, compress, evaluate, export), run locally one after another or on a Ray cluster
(`--executor ray`, one task per job; PyPI `ray`, optional extra `modelpress[ray]`).

    modelpress sweep w4a16-gptq-g128 wanda-50 my.yaml --model smollm2 --out sweeps/a --seeds 0,1
    modelpress sweep *.yaml --model ./hf-folder --out sweeps/b --executor ray      # ray.init() or RAY_ADDRESS

Each job exports to `<out>/<recipe>-seed<k>/`; `<out>/sweep.json` holds one row per job (recipe, seed,
bits/weight, perplexity, agreement, KL, seconds, export path), written atomically after every job, so a
partial sweep keeps its finished rows. A failed job records its one-line error instead of stopping the sweep."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError
from .io import atomic_write_text

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Job:
    recipe: str              # YAML path or shipped recipe name
    seed: int                # calibration seed
    out: str                 # export folder


def plan(recipes: list[str], seeds: list[int], out: str | Path) -> list[Job]:
    """One job per (recipe, seed); recipes are validated up front (a typo fails before any work)."""
    from .recipe import Recipe, resolve
    if not recipes:
        raise UserError("sweep needs at least one recipe (a YAML file or a shipped recipe name)")
    jobs, names = [], set()
    for r in recipes:
        Recipe.from_yaml(r)
        stem = resolve(r).stem
        if stem in names:
            raise UserError(f"two recipes are named {stem}: rename one (export folders are <out>/<recipe>-seed<k>)")
        names.add(stem)
        jobs += [Job(str(r), s, str(Path(out) / f"{stem}-seed{s}")) for s in seeds]
    return jobs


def run_job(job: Job, model: str | None, evaluate: bool = True) -> dict:
    """Run one job in this process; returns its summary row (never raises for a user mistake)."""
    from .api import run_recipe
    from .recipe import Recipe
    row = {**asdict(job), "status": "ok"}
    t0 = time.perf_counter()
    try:
        d = Recipe.from_yaml(job.recipe).to_dict()
        d["calibration"]["seed"] = job.seed
        rep = run_recipe(Recipe.from_dict(d, job.recipe), model, job.out, evaluate_models=evaluate, checkpoint=False)
    except (UserError, ValueError, OSError) as e:
        return {**row, "status": "error", "error": str(e).splitlines()[0] if str(e) else type(e).__name__,
                "seconds": time.perf_counter() - t0}
    row.update(seconds=time.perf_counter() - t0, bits_per_weight=rep["size"]["bits_per_weight"],
               compressed_bytes=rep["size"]["compressed_bytes"])
    if "eval" in rep:
        c = rep["eval"]["compressed"]
        row.update(perplexity=c["perplexity"], agreement=c.get("agreement"), kl=c.get("kl"),
                   original_perplexity=rep["eval"]["original"]["perplexity"])
    return row


def _write(out: Path, rows: list[dict], meta: dict) -> None:
    atomic_write_text(out / "sweep.json", json.dumps({**meta, "jobs": rows}, indent=1, default=float))


def sweep(recipes: list[str], model: str | None, out: str | Path, seeds: list[int] = (0,), executor: str = "local",
          evaluate: bool = True, ray_address: str | None = None) -> list[dict]:
    """Run every (recipe, seed) job and return the rows (also in `<out>/sweep.json`).

    >>> rows = modelpress.sweep.sweep(["w4a16-gptq-g128", "wanda-50"], "smollm2", "sweeps/a", seeds=[0, 1])
    >>> min(rows, key=lambda r: r["perplexity"])["recipe"]
    """
    if executor not in EXECUTORS:
        raise UserError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    out = Path(out)
    jobs = plan(list(recipes), list(seeds), out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": model, "executor": executor, "seeds": list(seeds), "recipes": list(recipes)}
    rows: list[dict] = []
    if executor == "local":
        for job in jobs:
            rows.append(run_job(job, model, evaluate))
            _write(out, rows, meta)
        return rows
    try:
        import ray
    except ImportError:
        raise UserError("ray is not installed: pip install 'modelpress[ray]' (or pip install ray), "
                        "or use --executor local") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(run_job)
        pending = {remote.remote(job, model, evaluate): job for job in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            pending.pop(done[0])
            rows.append(ray.get(done[0]))
            _write(out, rows, meta)
    finally:
        if started:
            ray.shutdown()
    order = {(j.recipe, j.seed): k for k, j in enumerate(jobs)}
    rows.sort(key=lambda r: order[(r["recipe"], r["seed"])])
    _write(out, rows, meta)
    return rows
