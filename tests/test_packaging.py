"""The built wheel carries every file the C++ kernel build reads (a non-editable install compiles from it)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "pagellm" / "model" / "layers" / "csrc"


def test_wheel_contains_every_kernel_source_and_included_header(tmp_path):
    # NOTE: from a copy, so no build/ folder of an earlier build can supply a file the package data misses
    src = tmp_path / "src"
    shutil.copytree(ROOT / "pagellm", src / "pagellm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("pagellm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = set()
    for source in CSRC.glob("*.cpp"):
        needed.add(source.name)
        needed |= set(re.findall(r'#include\s+"([^"]+)"', source.read_text()))
    assert "kernels.h" in needed  # the scan finds the local includes
    missing = sorted(n for n in needed if f"pagellm/model/layers/csrc/{n}" not in names)
    assert not missing, f"the wheel lacks {missing}: an installed pagellm would build no kernels"
