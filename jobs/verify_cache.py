"""Ray Job entry point: `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/verify_cache.py ...`.

Same as `er-ray cache verify DIR`."""

from _entry import run

if __name__ == "__main__":
    run("cache", "verify")
