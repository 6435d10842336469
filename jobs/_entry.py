"""What every job shares: import er_ray from the uploaded working dir (or the installed package) and run one
`er-ray` verb with the job's arguments, so a job takes exactly the CLI's options."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# er_ray's ray.init() passes env_vars (ER_RAY_HOME, HF_HUB_OFFLINE, ...) that a job's runtime_env may set too
# (`--runtime-env-json '{"env_vars": {"ER_RAY_HOME": ...}}'`); Ray refuses such a merge unless told to combine.
# The driver's values are read from this environment, which the job's env_vars already set: same values.
os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")


def run(*verb: str) -> None:
    from er_ray.cli import main

    sys.exit(main([*verb, *sys.argv[1:]]))
