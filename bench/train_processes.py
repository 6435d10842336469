"""What one Ray Train run costs before any training: the processes Ray starts for it and their CPU seconds.

An empty training function (or one that only imports what er_ray's worker imports: transformers, DeepSpeed) is fitted
by a `TorchTrainer` on the local Ray that er_ray starts; every process on the machine is sampled every 0.1 s and
the CPU seconds each spent during the fit are summed by the name Ray gives it (`ray::TrainController`, ...).

    .venv/bin/python bench/train_processes.py --rounds 3 --out bench/results/train_processes.json

On a 2-core machine the fixed cost of a run is bounded below by these CPU seconds / 2: it is Ray Train's, not the
model's (issue 17's end-to-end figure).
"""

import argparse
import json
import os
import threading
import time
from collections import defaultdict

import psutil


def empty_loop(config):
    if config["imports"]:  # what er_ray's worker pays in its set-up (er_ray.train_loop.Worker)
        import deepspeed  # noqa: F401
        import transformers.models.bert.modeling_bert  # noqa: F401


def _name(p: psutil.Process) -> str:
    cmd = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split(".")[0]  # "ray::TrainController.run" -> "ray::TrainController"
    return os.path.basename(cmd[1] if len(cmd) > 1 and cmd[0].endswith("python") else (cmd or ["?"])[0])


class Sampler:
    """CPU seconds per process during a window; a process is named by the last non-idle name it showed."""

    def __init__(self):
        self.start_cpu, self.cpu, self.names = {}, {}, {}
        self._stop = threading.Event()
        for p in psutil.process_iter():
            try:
                t = p.cpu_times()
                self.start_cpu[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            for p in psutil.process_iter():
                try:
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system - self.start_cpu.get(p.pid, 0.0)
                    name = _name(p)
                    if name != "ray::IDLE" or p.pid not in self.names:
                        self.names[p.pid] = name
                except psutil.Error:
                    pass
            time.sleep(0.1)

    def stop(self) -> dict[str, dict]:
        self._stop.set()
        self._thread.join()
        by_name = defaultdict(lambda: {"processes": 0, "cpu_s": 0.0, "new": 0})
        for pid, cpu in self.cpu.items():
            if cpu < 0.05:
                continue
            row = by_name[self.names.get(pid, "?")]
            row["processes"] += 1
            row["new"] += pid not in self.start_cpu
            row["cpu_s"] = round(row["cpu_s"] + cpu, 2)
        return dict(sorted(by_name.items(), key=lambda kv: -kv[1]["cpu_s"]))


def one_fit(imports: bool, storage: str) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    sampler = Sampler()
    t0 = time.perf_counter()
    TorchTrainer(empty_loop, train_loop_config={"imports": imports},
                 scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=ray.train.RunConfig(storage_path=storage)).fit()
    wall = time.perf_counter() - t0
    procs = sampler.stop()
    return {"imports": imports, "wall": round(wall, 2), "cpu_s": round(sum(r["cpu_s"] for r in procs.values()), 2),
            "new_processes": sum(r["new"] for r in procs.values()), "processes": procs}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--storage", default="/tmp/er_ray_train_processes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from er_ray.cluster import connect
    from er_ray.train import HEALTH_CHECK_INTERVAL

    t0 = time.perf_counter()
    connect(num_cpus=2)  # as `er-ray train` starts it: dashboard on
    ray_start = time.perf_counter() - t0
    os.environ.setdefault(HEALTH_CHECK_INTERVAL, "0.5")  # as er_ray.train.fit_run sets it
    time.sleep(10)  # the prestarted workers settle
    rounds = []
    for r in range(args.rounds):
        for imports in (False, True):
            row = one_fit(imports, args.storage)
            rounds.append(row)
            top = ", ".join(f"{k} {v['cpu_s']:.1f}" for k, v in list(row["processes"].items())[:6])
            print(f"round {r} imports={imports}: fit {row['wall']:.1f} s, CPU {row['cpu_s']:.1f} s in "
                  f"{row['new_processes']} new processes; {top}", flush=True)
    result = {"ray_start": round(ray_start, 2), "rounds": rounds}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
