"""The installed package holds the whole product: a wheel built from the tree (what a
cluster's ``pip install .`` gets, unlike the editable install of the test venv) carries
every module, the report template and the Slurm templates."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


def tree_files(*patterns: str) -> set[str]:
    """The files git tracks or would track (not ignored) that match ``patterns``."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                          *patterns], cwd=REPO, capture_output=True, text=True, check=True)
    return {p for p in out.stdout.split() if (REPO / p).is_file()}


def test_the_wheel_carries_every_module_and_template(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy, so that no build/ folder is left in the repo
    for name in tree_files("pyproject.toml", "README.md", "pipeline", "slurm"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--no-build-isolation", "--wheel-dir", str(tmp_path), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("pipeline-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {p for p in tree_files("pipeline") if p.endswith((".py", ".j2"))}
    wanted |= {f"pipeline/slurm_templates/{Path(p).name}" for p in tree_files("slurm")
               if p.endswith(".j2")}
    assert len(wanted) > 50
    missing = sorted(wanted - names)
    assert not missing, f"not in the wheel (add their packages to pyproject.toml): {missing}"
