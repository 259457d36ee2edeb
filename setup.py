"""Build hook: the wheel ships the checkout's config.yaml, providers/ and templates/ as
`mailrouter/defaults/`, the starter files `mailrouter init` writes. The rest of the
build is declared in pyproject.toml.

The repo-root files stay the one source: `make run`, the tests and an editable install
read them in place (`mailrouter.defaults.source`), and a build copies them, so the two
cannot drift. MANIFEST.in puts them in an sdist, for a wheel built from one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULTS = ("config.yaml", "providers", "templates")


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install reads them from the checkout
        target = Path(self.build_lib) / "mailrouter" / "defaults"
        for name in DEFAULTS:
            source, dest = ROOT / name, target / name
            if not source.exists():
                raise SystemExit(f"{source} is missing: a wheel ships it for `mailrouter init`")
            if dest.is_dir():
                shutil.rmtree(dest)  # a file removed from the checkout leaves no copy in build/
            if source.is_dir():
                ignore = shutil.ignore_patterns(".*", "*~", "__pycache__")
                shutil.copytree(source, dest, ignore=ignore)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, dest)


setup(cmdclass={"build_py": BuildPy})
