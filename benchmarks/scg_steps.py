"""scg_diffusion's quality and cost against the sampler and its number of steps (issue 24).

    python benchmarks/scg_steps.py RUN --prompts 6 --settings ddim:50,ddim:20,dpmpp_2m:10:logsnr

Two measurements per setting `solver:steps[:spacing]` (sampler.name, .steps, .spacing), in one
process, so the costs are ratios taken under the same load:
- unguided continuation exactly as mehldau-compare runs it (its prompts from the run's test
  split, `prompt_seconds` 5, `seconds` 10, 2 samples per prompt, seed 0; the worker's generate
  config): compute seconds per minute of music (the report's
  `compute_seconds_per_music_minute`) and the mean overlapping area (OA) over the compare
  features, with the report's jackknife interval;
- guided generation (every rule, scg.candidates 8, one 10.24 s window, 2 samples, each test
  piece's opening as the reference): the rule losses of the guided samples, mean with a
  jackknife interval over the samples, and their seconds.
A deterministic solver (dpmpp_2m) gets the unguided measurement only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from mehldau.cli.common import compose
from mehldau.evaluation import compare as C
from mehldau.evaluation import worker
from mehldau.train.checkpoint import branch_recipe, resolve_checkpoint


def _interval(values: list[float]) -> list[float]:
    from mehldau.evaluation.distribution import group_mean

    return list(group_mean([[float(v)] for v in values]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--settings", default="ddim:50,ddim:20,ddim:10,dpmpp_2m_sde:20,"
                                          "dpmpp_2m_sde:10,dpmpp_2m:20,dpmpp_2m:10")
    ap.add_argument("--guided", type=int, default=2, help="reference pieces for rule losses")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="scg_steps_"))
    ccfg = compose("compare", [f"runs=[{a.run}]", f"out={tmp / 'unused'}",
                               f"max_prompts={a.prompts}"])
    runs = C.load_runs([a.run])
    run = runs[0]
    ckpt = resolve_checkpoint(run.ckpt)
    recipe = branch_recipe(ckpt)
    ref = C.reference_files(ccfg, runs)
    seconds, ps = float(ccfg.seconds), float(ccfg.prompt_seconds)
    reference = C.reference_items(ref, seconds)
    prompts = C.write_prompts(ref, ccfg, tmp / "prompts")
    job = {"ckpt": str(ckpt), "seconds": seconds,
           "samples_per_prompt": int(ccfg.samples_per_prompt), "seed": int(ccfg.seed),
           "device": "cpu", "style": None, "prompts": prompts, "prompt_seconds": ps,
           "branch": run.branch, "name": run.name,
           "sampling": {k: ccfg[k] for k in ("temperature", "top_k", "top_p")}}
    rows = []
    for setting in a.settings.split(","):
        name, steps, spacing = (setting + ":uniform").split(":")[:3]
        out = tmp / setting.replace(":", "_")
        files = {}
        t0 = time.perf_counter()
        for p in prompts:
            gcfg = worker._generate_config(job, p, out / f"{p['name']}.mid",
                                           recipe.GENERATE_SETTINGS)
            gcfg.sampler.update(name=name, steps=int(steps), spacing=spacing)
            paths = recipe.generate(gcfg, ckpt)
            files[p["name"]] = [str(q) for q in paths if q.suffix == ".mid"]
        cost = time.perf_counter() - t0
        items = C.generated_items(run, {"files": files}, prompts, ps, seconds)
        oa = C.feature_table(C.System(setting, items), reference)["mean"]["oa"]
        row = {"setting": setting, "compute_s_per_music_min": cost / (len(items) * seconds) * 60,
               "oa_mean": oa}
        if name != "dpmpp_2m" and a.guided:
            losses: dict[str, list[float]] = {}
            t0 = time.perf_counter()
            for k, (_, path) in enumerate(ref[:a.guided]):
                gcfg = compose("generate", [f"ckpt={ckpt}", f"out={out / f'g{k}.mid'}",
                                            f"rules.reference={path}", "num_samples=2",
                                            "device=cpu", f"sampler.name={name}",
                                            f"sampler.steps={steps}",
                                            f"sampler.spacing={spacing}"])
                for q in recipe.generate(gcfg, ckpt):
                    if q.suffix == ".json":
                        for r, v in json.loads(q.read_text())["guided"].items():
                            losses.setdefault(r, []).append(v)
            row["guided_seconds"] = time.perf_counter() - t0
            row["rule_loss"] = {r: _interval(v) for r, v in losses.items()}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
