"""One run's share of a comparison, in its own process: generate every prompt's continuations,
score the reference pieces, and measure what that cost.

A separate process per run, so each branch's peak memory is its own (a process's peak
resident set only grows) and no branch's state (seeds, caches, threads) leaks into the next.
`python -m mehldau.evaluation.worker JOB.json RESULT.json`; the job is written by
`mehldau.evaluation.compare`.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from mehldau.cli.common import compose
from mehldau.errors import UserError
from mehldau.io import atomic_file
from mehldau.train.checkpoint import branch_recipe, resolve_checkpoint


def _generate_config(job: dict, prompt: dict, out: Path, uses: frozenset[str] | None):
    """What `mehldau-generate` would compose for this prompt: every branch continues the
    prompt's first prompt_seconds for `seconds`; a setting the branch does not use
    (`uses`, its recipe's GENERATE_SETTINGS) keeps its default, as generate would demand."""
    cfg = compose("generate", [])  # values set below: file names need no override quoting
    s = job["sampling"]
    cfg.ckpt, cfg.out = job["ckpt"], str(out)
    given = {"seconds": float(job["seconds"]), "num_samples": int(job["samples_per_prompt"]),
             "seed": int(job["seed"]), "temperature": float(s["temperature"]),
             "top_k": int(s["top_k"]), "top_p": float(s["top_p"]), "device": job["device"],
             "style": job.get("style"), "prompt": prompt["path"],
             "prompt_seconds": float(job["prompt_seconds"])}
    for key, value in given.items():
        if uses is None or key in uses:
            cfg[key] = value
        elif value != cfg[key] and prompt is job["prompts"][0]:  # said once per run
            print(f"compare: {job['branch']} does not use {key}; run {job['name']} samples "
                  "without it", file=sys.stderr)
    return cfg


def run(job: dict) -> dict:
    ckpt = resolve_checkpoint(job["ckpt"])
    recipe = branch_recipe(ckpt)
    uses = getattr(recipe, "GENERATE_SETTINGS", None)
    device = job["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out_dir = Path(job["out_dir"])
    files: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    for prompt in job["prompts"]:
        paths = recipe.generate(_generate_config(job, prompt, out_dir / f"{prompt['name']}.mid",
                                                  uses), ckpt)
        files[prompt["name"]] = [str(p) for p in paths if p.suffix == ".mid"
                                 and not p.name.endswith(".unguided.mid")]
    generate_seconds = time.perf_counter() - t0
    result = {"generate_seconds": generate_seconds, "files": files}
    if hasattr(recipe, "score") and job.get("score_files"):
        t0 = time.perf_counter()
        scores = recipe.score(ckpt, [(i, Path(p)) for i, p in job["score_files"]], device,
                              job.get("style"))
        result["likelihood_pieces"] = [s.to_dict() for s in scores]
        result["score_seconds"] = time.perf_counter() - t0
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main(argv: list[str] | None = None) -> int:
    job_path, result_path = (argv if argv is not None else sys.argv[1:])[:2]
    job = json.loads(Path(job_path).read_text())
    try:
        result = run(job)
    except UserError as e:
        print(f"mehldau-compare: error: run {job['name']}: {e}", file=sys.stderr)
        return 2
    with atomic_file(result_path) as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
