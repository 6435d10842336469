"""Issue 4's figures: recycled training and inference against full fine-tuning, side by side in one run.

    .venv/bin/python bench/train_speed.py --model minilm --task trec --task clothing_department \
        --max-train-examples 3000 --epochs 2 --seeds 0,1,2

For each task: build the layer-k cache (k = L/2, timed), then with the same epochs, batch size, seed and hardware
train `finetune` (whole model, from text), recycled `lora` and `bottleneck` (from the cache), and PEFT LoRA on
every layer from text (no cache: what a PEFT user does today). Reports seconds per epoch and their ratios, test
accuracy (mean over seeds), the data-loading stall, cache amortisation (build time in finetune epochs), and the
inference ratio: the test split through the full fine-tuned model from raw text / the recycled model from the
cache, same batch size, in one process (tokenizing and cache decoding included), median of alternating passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from er_ray import cache, pretrained, tasks  # noqa: E402
from er_ray.cache_build import build_cache  # noqa: E402
from er_ray.cluster import connect  # noqa: E402
from er_ray.predict import Predictor  # noqa: E402
from er_ray.options import CacheOptions, TrainOptions  # noqa: E402
from er_ray.train import train  # noqa: E402
from machine import cpu_ticks, steal_fraction  # noqa: E402  (bench/machine.py)

ARMS = {  # name -> TrainOptions overrides
    "finetune": dict(full_finetune=True, adapter="full"),
    "recycled_lora": dict(adapter="lora", adapter_size=16),
    "recycled_bottleneck": dict(adapter="bottleneck", adapter_size=64),
    # the paper's usual bottleneck setting: width 256, learning rate 1e-4 to 2e-4
    "recycled_bottleneck_256": dict(adapter="bottleneck", adapter_size=256, learning_rate=2e-4),
    "peft_lora_all_layers": dict(adapter="lora", adapter_size=16, from_text=True, cut_layer=0),
}


def inference_pass(run: Path, source: str, task, cache_dir: str | None, batch_size: int):
    """A timed pass over the test split through `er-ray predict`'s own Predictor (the same batching, padding and
    forward passes; no Ray), from raw text (lower + upper) or from the cache. The model and the inputs (the
    cache's test rows, still encoded) are loaded once, outside the timing; each call of the returned function
    times tokenizing or decoding plus the forward passes, and returns its seconds."""
    test = task.splits["test"]
    cache_dtype = None
    if source == "cache":
        info = json.loads((run / "model" / "task.json").read_text())
        c = cache.open_cache(cache_dir, info["spec"]["cut_layer"])
        t = c.read()
        pos = {i: n for n, i in enumerate(t.column("id").to_pylist())}
        batch, cache_dtype = t.take([pos[i] for i in test.column("id").to_pylist()]), c.manifest.dtype
    else:
        batch = test.select(["id", "text"])
    predictor = Predictor([str(run)], source, batch_size, threads=os.cpu_count(), cache_dtype=cache_dtype)

    def timed() -> float:
        t0 = time.perf_counter()
        predictor(batch)
        return time.perf_counter() - t0

    return timed


def main():
    from er_ray import console

    console.configure()  # er_ray's own console, as the CLI's: Ray's INFO lines and progress stay in its logs
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--task", action="append", default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-train-examples", type=int, default=None)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"arms to run, in order (built in: {', '.join(ARMS)})")
    ap.add_argument("--define", action="append", default=[], metavar="NAME=JSON",
                    help='an extra arm for --arms: TrainOptions overrides as JSON, e.g. '
                         'lora32=\'{"adapter": "lora", "adapter_size": 32}\'')
    ap.add_argument("--inference-repeats", type=int, default=7, help="alternating timed passes per side")
    ap.add_argument("--work", default="/tmp/er_ray_train_bench")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    if a.inference_repeats < 1:
        ap.error("--inference-repeats must be at least 1")
    tasks_ = a.task or ["trec", "clothing_department"]
    seeds = [int(s) for s in a.seeds.split(",")]
    arm_options = dict(ARMS)
    fields = {f.name for f in dataclasses.fields(TrainOptions)} - {  # the ones the benchmark sets for every arm
        "task", "model", "output", "cache", "epochs", "patience", "batch_size", "seed", "max_length",
        "max_train_examples"}
    for d in a.define:  # checked here, not when the arm's first run starts after the cache is built
        arm_name, eq, text = d.partition("=")
        try:
            overrides = json.loads(text) if eq and arm_name else None
        except json.JSONDecodeError as e:
            ap.error(f"--define {d!r}: the options are not JSON ({e})")
        if not isinstance(overrides, dict):
            ap.error(f"--define {d!r}: write NAME={{...}}, a JSON object of TrainOptions fields")
        if bad := sorted(set(overrides) - fields):
            ap.error(f"--define {arm_name}: {bad} are not options an arm may set ({', '.join(sorted(fields))})")
        arm_options[arm_name] = overrides
    arms = a.arms.split(",")
    if unknown := [arm for arm in arms if arm not in arm_options]:
        ap.error(f"unknown arms {unknown}: built in are {list(ARMS)}; define more with --define")
    connect()
    fp = pretrained.fingerprint(a.model, a.max_length)
    k = fp["num_layers"] // 2
    report = {"model": a.model, "cut_layer": k, "epochs": a.epochs, "batch_size": a.batch_size,
              "max_length": a.max_length, "max_train_examples": a.max_train_examples, "seeds": seeds, "tasks": {}}
    for name in tasks_:
        task = tasks.load_task(name)
        out = Path(a.work) / f"{a.model}-{task.spec.name}"  # a spec path names its task too
        cache_dir = out / "cache"
        t0 = time.perf_counter()
        build_cache(CacheOptions(corpus=[name], output=str(cache_dir), model=a.model, cut_layer=[k],
                                             max_length=a.max_length))
        cache_s = time.perf_counter() - t0
        res: dict = {"arm_options": {arm: arm_options[arm] for arm in arms}, "cache_build_seconds": cache_s,
                     "documents": sum(task.sizes().values()), "arms": {}}
        for arm in arms:
            runs = []
            for seed in seeds:
                opts = TrainOptions(task=[name], model=a.model, output=str(out), cache=str(cache_dir),
                                    epochs=a.epochs, patience=a.epochs, batch_size=a.batch_size, seed=seed,
                                    max_length=a.max_length, max_train_examples=a.max_train_examples,
                                    **arm_options[arm])
                # Every run from scratch: Ray Train resumes a run whose checkpoints (from an earlier invocation
                # with the same settings) are in the work folder, and its epochs would not be this run's.
                shutil.rmtree(out / "ray", ignore_errors=True)
                ticks = cpu_ticks()
                m = train(opts)[0]
                runs.append({k2: m[k2] for k2 in ("dev", "test", "seconds_per_epoch", "examples_per_second",
                                                  "data_stall", "trainable_parameters", "epochs_run")})
                runs[-1]["run"] = str(Path(opts.output) / "runs" / m["run"])
                runs[-1]["steal"] = steal_fraction(ticks, cpu_ticks())  # the hypervisor's share, for the record
            res["arms"][arm] = {"runs": runs,
                                "test_mean": float(np.mean([r["test"] for r in runs])),
                                "test_std": float(np.std([r["test"] for r in runs])),
                                "seconds_per_epoch": float(np.mean([r["seconds_per_epoch"] for r in runs])),
                                "data_stall": float(np.mean([r["data_stall"] for r in runs])),
                                "steal": float(np.mean([r["steal"] for r in runs]))}
            print(f"[bench] {name} {arm}: {res['arms'][arm]['seconds_per_epoch']:.1f} s/epoch, "
                  f"test {res['arms'][arm]['test_mean']:.4f}", flush=True)
        ft = res["arms"].get("finetune")
        if ft:
            for arm, r in res["arms"].items():
                r["train_speedup_vs_finetune"] = ft["seconds_per_epoch"] / r["seconds_per_epoch"]
                r["test_minus_finetune_points"] = 100 * (r["test_mean"] - ft["test_mean"])
            res["cache_build_in_finetune_epochs"] = cache_s / ft["seconds_per_epoch"]
            if "recycled_lora" in res["arms"]:
                saved = ft["seconds_per_epoch"] - res["arms"]["recycled_lora"]["seconds_per_epoch"]
                res["break_even_epochs"] = cache_s / saved if saved > 0 else None
                ft_run = Path(ft["runs"][0]["run"])
                rc_run = Path(res["arms"]["recycled_lora"]["runs"][0]["run"])
                # One pass per side is ~1 s and noisy here: the two sides alternate, and the ratio is of medians.
                from_text = inference_pass(ft_run, "text", task, None, 64)
                from_cache = inference_pass(rc_run, "cache", task, str(cache_dir), 64)
                text_s, cache_s2 = [], []
                for _ in range(a.inference_repeats):
                    text_s.append(from_text())
                    cache_s2.append(from_cache())
                res["inference"] = {"text_full_model_seconds": text_s, "cache_recycled_seconds": cache_s2,
                                    "ratio": float(np.median(text_s) / np.median(cache_s2)),
                                    "ratio_min_max": [float(min(t / c for t, c in zip(text_s, cache_s2))),
                                                      float(max(t / c for t, c in zip(text_s, cache_s2)))],
                                    "test_examples": task.sizes()["test"]}
        report["tasks"][name] = res
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"train_{a.model}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({t: {arm: {"s/epoch": r["seconds_per_epoch"], "speedup": r.get("train_speedup_vs_finetune"),
                                "test": r["test_mean"]} for arm, r in v["arms"].items()} | {
        "inference_ratio": v.get("inference", {}).get("ratio")} for t, v in report["tasks"].items()}, indent=1))


if __name__ == "__main__":
    main()
