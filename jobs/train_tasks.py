"""Ray Job entry point: `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train_tasks.py ...`.

Same options as `er-ray train` (see `er-ray train --help`); several --task train at once."""

from _entry import run

if __name__ == "__main__":
    run("train")
