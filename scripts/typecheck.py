"""mypy on the library as it is installed: `onnxlr`, with the rules folder `passes/` at `onnxlr.passes`.

setuptools maps `onnxlr.passes` to the top-level `passes/` folder (pyproject.toml's package-dir), which mypy cannot
follow from the source tree: every `from onnxlr.passes import ...` would be `Any`. So the package is laid out as
installed in a temporary folder of symbolic links (onnxlr/* and onnxlr/passes -> passes/) and checked there, with
the settings of pyproject.toml's [tool.mypy]; the paths it reports are the repository's. `make lint` runs it.

    python scripts/typecheck.py          # exit status: mypy's (0 clean, 1 errors)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with tempfile.TemporaryDirectory(prefix="onnxlr-typecheck-") as folder:
        package = Path(folder) / "onnxlr"
        package.mkdir()
        for entry in sorted((ROOT / "onnxlr").iterdir()):
            if entry.name != "__pycache__":
                (package / entry.name).symlink_to(entry)
        (package / "passes").symlink_to(ROOT / "passes")
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
             "--cache-dir", str(ROOT / ".mypy_cache"), "onnxlr"],
            cwd=folder, capture_output=True, text=True)
    # onnxlr/passes/x.py is the repository's passes/x.py
    output = (result.stdout + result.stderr).replace("onnxlr/passes/", "passes/")
    print(output, end="")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
