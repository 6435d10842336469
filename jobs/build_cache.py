"""Ray Job entry point: `ray job submit --working-dir . -- python jobs/build_cache.py --corpus ... --output ...`.

Same options as `er-ray cache` (see `er-ray cache --help`); `jobs/build_cache.py verify DIR` verifies."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir holds er_ray/

from er_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["cache", *sys.argv[1:]]))
