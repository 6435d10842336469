"""Ray Job entry point: `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/finetune.py ...`.

Same options as `er-ray finetune` (see `er-ray finetune --help`): the full fine-tuning baseline."""

from _entry import run

if __name__ == "__main__":
    run("finetune")
