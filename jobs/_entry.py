"""What every job shares: import er_ray from the uploaded working dir (or the installed package) and run one
`er-ray` verb with the job's arguments, so a job takes exactly the CLI's options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(*verb: str) -> None:
    from er_ray.cli import main

    sys.exit(main([*verb, *sys.argv[1:]]))
