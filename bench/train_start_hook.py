"""Issue 17, Ray Train's worker start: would importing torch, transformers, PEFT and DeepSpeed in Ray's prestarted
worker processes (a `worker_process_setup_hook`), while the driver cuts its data, shorten the wait for the first
step? One local Ray per call, one TorchTrainer worker whose loop imports what er_ray's loop imports.

    for arm in plain hook plain hook; do .venv/bin/python bench/train_start_hook.py $arm; done

Prints: Ray's start, fit() to the loop's first line, the loop's own imports, the whole fit.
"""

import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
LOOP_TIMES = "/tmp/er_ray_train_start_hook.txt"


def preimport():
    """The hook: runs in every worker process Ray starts for this job."""
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401


def loop(config):
    start = time.time()
    import er_ray.train_loop  # noqa: F401
    import deepspeed  # noqa: F401
    import peft  # noqa: F401

    Path(LOOP_TIMES).write_text(f"{start} {time.time()}")


def main():
    arm, data_seconds = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 6.0
    t0 = time.time()
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false",
                        "PYTHONPATH": os.pathsep.join([str(BENCH.parent), str(BENCH)])}}
    if arm == "hook":
        env["worker_process_setup_hook"] = "train_start_hook.preimport"
    ray.init(num_cpus=2, runtime_env=env, logging_level="WARNING", log_to_driver=False)
    ray_s = time.time() - t0
    time.sleep(data_seconds)  # the driver's data phase, which the hook's imports may overlap
    t1 = time.time()
    TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1),
                 run_config=ray.train.RunConfig(storage_path="/tmp/er_ray_train_start_hook",
                                                name=f"{arm}-{t1:.0f}")).fit()
    fit_s = time.time() - t1
    start, imported = map(float, Path(LOOP_TIMES).read_text().split())
    print(f"{arm}: Ray {ray_s:.1f} s, fit() to the loop {start - t1:.1f} s, the loop's imports "
          f"{imported - start:.1f} s, fit {fit_s:.1f} s", flush=True)


if __name__ == "__main__":
    main()
