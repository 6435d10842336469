"""Running whole `er-ray` commands from a chosen er_ray checkout (`--code LABEL=PATH`), for the A/B benchmarks in
this folder (cache_ab, command_processes, end_to_end, predict_many)."""

import argparse
import os
import sys
from pathlib import Path

# `python -m er_ray.cli`, not the installed `er-ray` script: with --code, an older checkout may lack the
# function the script calls (cli.run since de93b83)
ER_RAY = [sys.executable, "-m", "er_ray.cli"]


def codes_from(ap: argparse.ArgumentParser, given: list[str] | None, default: dict) -> dict:
    """LABEL -> PATH from repeated `--code LABEL=PATH` (`default` when none is given); a usage error for a value
    without "=" or a PATH that holds no er_ray checkout (PYTHONPATH would then silently fall back to the installed
    er_ray, measured under the wrong label)."""
    if bad := [c for c in given or [] if "=" not in c]:
        ap.error(f"--code takes LABEL=PATH, got {bad[0]!r}")
    codes = dict(c.split("=", 1) for c in given) if given else dict(default)
    if bad := [p for p in codes.values() if p and not (Path(p) / "er_ray" / "cli.py").is_file()]:
        ap.error(f"--code {bad[0]}: no er_ray checkout there (PYTHONPATH would fall back to the installed er_ray)")
    return codes


def command_env(code: str | None) -> dict[str, str]:
    """The environment of one timed command: its own local Ray, and `code`'s er_ray first on the path."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    if code:
        env["PYTHONPATH"] = str(Path(code).resolve())
    return env
