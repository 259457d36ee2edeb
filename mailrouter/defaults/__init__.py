"""The starter files `mailrouter init` writes: config.yaml, providers/ and templates/.

A wheel carries them in this package (setup.py copies them at build time); in a checkout
(an editable install) they are the repo-root files `make run` uses. Either way there is
one copy to edit: the repo's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

NAMES = ("config.yaml", "providers", "templates")
_HERE = Path(__file__).resolve().parent


def source() -> Path:
    """The folder holding config.yaml, providers/ and templates/ to start from."""
    for root in (_HERE, _HERE.parents[1]):
        if all((root / name).exists() for name in NAMES):
            return root
    raise FileNotFoundError(f"no packaged defaults in {_HERE}: the installation is incomplete")


def _files(root: Path) -> Iterator[Path]:
    yield Path("config.yaml")
    for folder in NAMES[1:]:
        for path in sorted((root / folder).rglob("*")):
            relative = path.relative_to(root)
            hidden = any(part.startswith(".") or part == "__pycache__" for part in relative.parts)
            if path.is_file() and not hidden and not path.name.endswith("~"):
                yield relative


def install(target: Path) -> list[tuple[Path, bool]]:
    """Write the starter files into `target`, never over an existing file; return each
    file with True when it was written, False when it was already there (left as is)."""
    root = source()
    done = []
    for relative in _files(root):
        dest = target / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with dest.open("xb") as out:  # exclusive: an existing file is never replaced
                out.write((root / relative).read_bytes())
        except FileExistsError:
            done.append((dest, False))
        else:
            done.append((dest, True))
    return done
