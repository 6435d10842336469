"""Serving several task models over one corpus (issue 17, item 4): N recycled runs predicted by N separate
`er-ray predict` commands against one `er-ray predict --run A --run B ...`, from the cache and from raw text; and
the end-to-end predict ratio: raw text through a fully fine-tuned model against a recycled model from the cache.
Every arm is a whole command as a user runs it (its own local Ray), wall time from start to exit, rounds
alternated in one invocation (this machine is noisy). Predictions of the one pass are checked against each
separate run's.

    .venv/bin/python bench/predict_many.py --task trec --runs 3 --rounds 2

The N runs (k = L/2, LoRA 16, seeds 0..N-1) and the fine-tuning run are trained once, small (their accuracy is not
measured here); the corpus is the task's whole document set (TREC: 5,452 questions).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from er_ray.options import TrainOptions  # noqa: E402

ER_RAY = str(Path(sys.executable).with_name("er-ray"))


def train_runs(work: Path, task: str, n: int, max_length: int) -> tuple[list[str], str, str]:
    """N recycled runs and one fine-tuning run (trained if missing, in one `er-ray train` process each kind)."""
    from er_ray.train import run_all

    small = dict(epochs=1, max_train_examples=200, max_length=max_length, output=str(work))
    recycled = [(TrainOptions(task=[task], seed=s, **small), task) for s in range(n)]
    finetune = [(TrainOptions(task=[task], full_finetune=True, **small), task)]
    names = [m["run"] for m in run_all(recycled + finetune, work, max_concurrent=2, skip_done=True)]
    (cache,) = [str(p) for p in (work / "caches").iterdir() if p.name.startswith(task)]
    import ray

    ray.shutdown()  # every timed command starts its own local Ray, as a user's would
    return [str(work / "runs" / r) for r in names[:n]], str(work / "runs" / names[n]), cache


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([ER_RAY, "predict", *args], capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": ""})
    if proc.returncode != 0:
        raise SystemExit(f"er-ray predict {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return round(time.perf_counter() - t0, 2)


def main() -> None:
    from er_ray import console

    console.configure()  # er_ray's own console, as the CLI's: Ray's INFO lines and progress stay in its logs
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="trec")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--work", default="/tmp/er_ray_predict_many")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "predict_many_minilm.json"))
    args = ap.parse_args()
    work = Path(args.work)
    runs, finetune, cache = train_runs(work, args.task, args.runs, args.max_length)
    preds = work / "preds"
    arms = {
        "separate_cache": lambda: sum(timed(["--run", r, "--corpus", args.task, "--cache", cache, "--output",
                                             str(preds / "sep_cache" / Path(r).name)]) for r in runs),
        "one_pass_cache": lambda: timed([*sum((["--run", r] for r in runs), []), "--corpus", args.task,
                                         "--cache", cache, "--output", str(preds / "one_cache")]),
        "separate_text": lambda: sum(timed(["--run", r, "--corpus", args.task, "--output",
                                            str(preds / "sep_text" / Path(r).name)]) for r in runs),
        "one_pass_text": lambda: timed([*sum((["--run", r] for r in runs), []), "--corpus", args.task,
                                        "--output", str(preds / "one_text")]),
        "finetune_text": lambda: timed(["--run", finetune, "--corpus", args.task, "--output",
                                        str(preds / "finetune_text")]),
        "recycled_cache": lambda: timed(["--run", runs[0], "--corpus", args.task, "--cache", cache, "--output",
                                         str(preds / "recycled_cache")]),
    }
    results: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(args.rounds):
        for arm, run in arms.items():
            if arm == "separate_cache":
                shutil.rmtree(preds, ignore_errors=True)
            results[arm].append(run())
            print(f"round {r + 1}, {arm}: {results[arm][-1]} s", flush=True)
            if arm.startswith("one_pass"):  # the one pass gives each run's own predictions
                kind = arm.split("_")[-1]
                for run_dir in runs:
                    name = Path(run_dir).name
                    one = pq.read_table(preds / f"one_{kind}" / name / "predictions.parquet").sort_by("id")
                    sep = pq.read_table(preds / f"sep_{kind}" / name / "predictions.parquet").sort_by("id")
                    assert one.column("label").to_pylist() == sep.column("label").to_pylist(), (arm, name)
    mean = {a: sum(v) / len(v) for a, v in results.items()}
    summary = {
        "one_pass_over_separate_cache": round(mean["one_pass_cache"] / mean["separate_cache"], 3),
        "one_pass_over_separate_text": round(mean["one_pass_text"] / mean["separate_text"], 3),
        "finetune_text_over_recycled_cache": round(mean["finetune_text"] / mean["recycled_cache"], 3),
    }
    out = {"task": args.task, "runs": args.runs, "rounds": args.rounds, "max_length": args.max_length,
           "wall_seconds": results, "mean": mean, "summary": summary}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
