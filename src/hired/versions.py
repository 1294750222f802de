"""The versions of the packages that shape hired's figures, for records and for comparing environments.

Benchmark, evidence and evaluation records store :func:`package_versions`, so that a figure can be
traced to the releases it came from. ``python -m hired.versions --against constraints/tested.txt``
lists what the running environment has that differs from a constraints file (what ``make test-latest``
prints before its run).
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

# Distributions whose releases can move a number hired reports: the model code and its kernels, the
# tokenizer, the image decoding and resizing, the offline encoder's runtime, the statistics.
RECORDED_PACKAGES = (
    "torch",
    "transformers",
    "huggingface_hub",
    "tokenizers",
    "safetensors",
    "numpy",
    "pillow",
    "onnx",
    "onnxruntime",
    "scikit-image",
    "scipy",
)


def package_versions(packages: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (``None`` when not installed), plus Python and hired."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in (*packages, "hired"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file, by normalised name (comments skipped)."""
    pinned = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        name, sep, version = line.partition("==")
        if sep:
            pinned[_normalise(name)] = version.strip()
    return pinned


def differences(pinned: dict[str, str]) -> list[tuple[str, str, str | None]]:
    """``(package, tested, installed)`` for every pinned package installed at another version."""
    rows = []
    for name, tested in sorted(pinned.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != tested:
            rows.append((name, tested, installed))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hired.versions",
        description="Print the versions of the packages that shape hired's figures, or, with --against, every "
        "package installed at a version other than the one a constraints file pins.",
    )
    parser.add_argument("--against", type=Path, metavar="CONSTRAINTS", help="a constraints file, e.g. constraints/tested.txt")
    args = parser.parse_args(argv)
    if args.against is None:
        for name, version in package_versions().items():
            print(f"{name:<16} {version or '-'}")
        return 0
    if not args.against.is_file():
        print(f"hired.versions: error: constraints file not found: {args.against}", file=sys.stderr)
        return 2
    rows = differences(read_constraints(args.against))
    if not rows:
        print(f"every package is at the version {args.against} pins")
        return 0
    print(f"packages that differ from {args.against} (tested -> installed):")
    for name, tested, installed in rows:
        print(f"  {name:<24} {tested:>16} -> {installed or 'not installed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
