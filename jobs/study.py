"""Ray Job entry point: `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/study.py ...`.

Same options as `er-ray study` (see `er-ray study --help`)."""

from _entry import run

if __name__ == "__main__":
    run("study")
