"""Serving several task models over one corpus (issue 17, item 4): N recycled runs predicted by N separate
`er-ray predict` commands against one `er-ray predict --run A --run B ...`, from the cache and from raw text; and
the end-to-end predict ratio: raw text through a fully fine-tuned model against a recycled model from the cache.
Every arm is a whole command as a user runs it, wall time from start to exit, rounds alternated in one invocation
(this machine is noisy). Predictions of the one pass are checked against each separate run's.

`--ways here,ray` times each arm both ways predict can run: on the command's own process (the default for a small
input on one machine) and through Ray Data's actors on its own local Ray (`ER_RAY_DRIVER_READ_BYTES=0`, as for an
input over the limit, or a cluster).

    .venv/bin/python bench/predict_many.py --task trec --runs 3 --rounds 2
    .venv/bin/python bench/predict_many.py --task /tmp/e2e/clothing_recommended_5000.yaml --ways here,ray
    .venv/bin/python bench/predict_many.py ... --code new=. --code old=/tmp/wt_old   # two checkouts, alternated

With `--code LABEL=PATH` (repeatable; the er_ray on PYTHONPATH, e.g. a worktree of an older commit) every arm runs
once per checkout, back to back; the runs and the cache are this checkout's, trained once.

The N runs (every option at its default: k = L/2 and, since d73bdde, the whole upper layers; LoRA 16 before;
seeds 0..N-1) and the fine-tuning run are trained once, small (their accuracy is not measured here); the corpus
is the task's whole document set (TREC: 5,452 questions).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from er_ray.options import TrainOptions  # noqa: E402
from checkouts import ER_RAY, codes_from, command_env  # noqa: E402


def train_runs(work: Path, task: str, n: int, max_length: int | None) -> tuple[list[str], str, str]:
    """N recycled runs and one fine-tuning run (trained if missing, in one `er-ray train` process each kind)."""
    from er_ray.train import run_all

    small = dict(epochs=1, max_train_examples=200, max_length=max_length, output=str(work))
    recycled = [(TrainOptions(task=[task], seed=s, **small), task) for s in range(n)]
    finetune = [(TrainOptions(task=[task], full_finetune=True, **small), task)]
    names = [m["run"] for m in run_all(recycled + finetune, work, max_concurrent=2, skip_done=True)]
    (cache,) = [str(p) for p in (work / "caches").iterdir()]  # one task per --work folder
    import ray

    ray.shutdown()  # every timed command starts its own local Ray, as a user's would
    return [str(work / "runs" / r) for r in names[:n]], str(work / "runs" / names[n]), cache


def timed(args: list[str], way: str, code: str | None = None) -> float:
    """One whole `er-ray predict` command's wall time; `way`: "here" (its own process) or "ray" (Ray Data);
    `code`: the er_ray checkout to run (None: this one)."""
    env = command_env(code)
    if way == "ray":
        env["ER_RAY_DRIVER_READ_BYTES"] = "0"
    else:
        env.pop("ER_RAY_DRIVER_READ_BYTES", None)
    t0 = time.perf_counter()
    proc = subprocess.run([*ER_RAY, "predict", *args], capture_output=True, text=True, env=env)
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
    ap.add_argument("--max-length", type=int, default=None, help="default: the task type's (64 as before for TREC)")
    ap.add_argument("--ways", default="ray", help="here, ray, or both (here,ray): see above")
    ap.add_argument("--arms", default=None, help="some of the arms, comma-separated (default: all six; a ratio is "
                                                 "reported where both its arms ran)")
    ap.add_argument("--code", action="append", default=None, help="LABEL=PATH of an er_ray checkout (repeatable)")
    ap.add_argument("--work", default="/tmp/er_ray_predict_many")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "predict_many_minilm.json"))
    args = ap.parse_args()
    codes: dict[str, str | None] = codes_from(ap, args.code, {"": None})
    work = Path(args.work)
    runs, finetune, cache = train_runs(work, args.task, args.runs, args.max_length)
    ways = args.ways.split(",")

    def arms(way: str, preds: Path, code: str | None = None) -> dict:
        t = args.task

        def run(a: list[str]) -> float:
            return timed(a, way, code)

        return {
            "separate_cache": lambda: sum(run(["--run", r, "--corpus", t, "--cache", cache, "--output",
                                               str(preds / "sep_cache" / Path(r).name)]) for r in runs),
            "one_pass_cache": lambda: run([*sum((["--run", r] for r in runs), []), "--corpus", t, "--cache", cache,
                                           "--output", str(preds / "one_cache")]),
            "separate_text": lambda: sum(run(["--run", r, "--corpus", t, "--output",
                                              str(preds / "sep_text" / Path(r).name)]) for r in runs),
            "one_pass_text": lambda: run([*sum((["--run", r] for r in runs), []), "--corpus", t,
                                          "--output", str(preds / "one_text")]),
            "finetune_text": lambda: run(["--run", finetune, "--corpus", t, "--output", str(preds / "finetune_text")]),
            "recycled_cache": lambda: run(["--run", runs[0], "--corpus", t, "--cache", cache, "--output",
                                           str(preds / "recycled_cache")]),
        }

    results: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for arm in (args.arms.split(",") if args.arms else arms("", Path())):
            for way, (label, code) in ((w, c) for w in ways for c in codes.items()):
                # the ways and checkouts of one arm back to back: side by side in the machine's drift
                preds = work / "preds" / way / label
                if arm == "separate_cache":
                    shutil.rmtree(preds, ignore_errors=True)
                key = (arm if ways == ["ray"] else f"{arm}_{way}") + (f"_{label}" if label else "")  # as first named
                results.setdefault(key, []).append(arms(way, preds, code)[arm]())
                print(f"round {r + 1}, {key}: {results[key][-1]} s", flush=True)
                if arm.startswith("one_pass"):  # the one pass gives each run's own predictions
                    kind = arm.split("_")[-1]
                    for run_dir in runs:
                        name = Path(run_dir).name
                        one = pq.read_table(preds / f"one_{kind}" / name / "predictions.parquet").sort_by("id")
                        sep = pq.read_table(preds / f"sep_{kind}" / name / "predictions.parquet").sort_by("id")
                        assert one.column("label").to_pylist() == sep.column("label").to_pylist(), (arm, name)
        if len(ways) > 1:  # the two ways give the same predictions
            for f in (work / "preds" / ways[0]).rglob("predictions.parquet"):
                a = pq.read_table(f).sort_by("id")
                b = pq.read_table(work / "preds" / ways[1] / f.relative_to(work / "preds" / ways[0])).sort_by("id")
                assert a.column("label").to_pylist() == b.column("label").to_pylist(), f
    agreement = {}  # checkouts may batch differently: the share of labels each gives as the first one did
    if len(codes) > 1:
        first, *others = codes
        for way in ways:
            for f in (work / "preds" / way / first).rglob("predictions.parquet"):
                a = pq.read_table(f).sort_by("id").column("label").to_pylist()
                for other in others:
                    b = pq.read_table(work / "preds" / way / other / f.relative_to(work / "preds" / way / first))
                    same = sum(x == y for x, y in zip(a, b.sort_by("id").column("label").to_pylist()))
                    where = f.parent.relative_to(work / "preds" / way / first)  # e.g. one_cache/<run>
                    agreement[f"{other} vs {first}: {where}_{way}"] = round(same / len(a), 5)
    mean = {a: sum(v) / len(v) for a, v in results.items()}
    summary = {}
    for way, label in ((w, c) for w in ways for c in codes):
        sfx = ("" if ways == ["ray"] else f"_{way}") + (f"_{label}" if label else "")
        for name, a, b in (("one_pass_over_separate_cache", "one_pass_cache", "separate_cache"),
                           ("one_pass_over_separate_text", "one_pass_text", "separate_text"),
                           ("finetune_text_over_recycled_cache", "finetune_text", "recycled_cache")):
            if a + sfx in mean and b + sfx in mean:
                summary[name + sfx] = round(mean[a + sfx] / mean[b + sfx], 3)
    out = {"task": args.task, "runs": args.runs, "rounds": args.rounds, "max_length": args.max_length,
           "ways": ways, "codes": codes, "wall_seconds": results, "mean": mean, "summary": summary,
           "label_agreement": agreement}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({**summary, **agreement}, indent=1))


if __name__ == "__main__":
    main()
