"""Ray Job entry point for the main job: `ray job submit --working-dir . -- python jobs/demo.py [options]`.

Same options as `er-ray demo` (see `er-ray demo --help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir holds er_ray/

from er_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
