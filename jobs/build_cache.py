"""Ray Job entry point: `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/build_cache.py ...`.

Same options as `er-ray cache` (see `er-ray cache --help`)."""

from _entry import run

if __name__ == "__main__":
    run("cache")
