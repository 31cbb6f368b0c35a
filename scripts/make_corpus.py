#!/usr/bin/env python
"""Write a training corpus of text files from the documentation of Python's standard library.

Real, redistributable (PSF License), and already on every machine with Python: the docstrings of
the standard library's public modules, classes and functions, grouped per module and cut into
pieces of about `--chars` characters at paragraph boundaries. One file per piece.

    .venv/bin/python scripts/make_corpus.py build/corpus/stdlib-docs [--chars 2400]

The standard library holds ~90 texts of 750 tokens or more (the length NVIDIA trained its
surrogates on). `--packages numpy,networkx,sympy` adds the docstrings of installed packages and
all their submodules (BSD-licensed prose with examples), for a corpus of longer texts:

    .venv/bin/python scripts/make_corpus.py build/corpus/docs-4400 --chars 4400 --packages numpy,networkx,sympy

`--no-stdlib` leaves the standard library out (an evaluation corpus no shipped surrogate saw).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
import warnings
from pathlib import Path

SKIP = ("test", "idlelib", "tkinter", "turtle", "this", "antigravity", "lib2to3", "ensurepip", "venv", "__")


def module_docs(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = importlib.import_module(name)
    parts = [inspect.getdoc(mod) or ""]
    for attr in sorted(vars(mod)):
        obj = getattr(mod, attr, None)
        if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)) and \
                getattr(obj, "__module__", None) == name:
            parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p.strip() for p in parts if p and len(p) > 40)


def pieces(text: str, chars: int) -> list[str]:
    out, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) > chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        out.append(cur)
    return out


def package_modules(package: str) -> list[str]:
    """`package` and every submodule it has, by name, private and test modules left out."""
    try:
        root = importlib.import_module(package)
    except ImportError as e:
        raise SystemExit(f"--packages: {package} is not installed ({e})") from None
    names = [package]
    for m in pkgutil.walk_packages(getattr(root, "__path__", []), prefix=f"{package}.", onerror=lambda _: None):
        parts = m.name.split(".")
        if not any(p.startswith("_") or p in ("tests", "testing", "conftest") for p in parts):
            names.append(m.name)
    return sorted(names)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--chars", type=int, default=2400)
    ap.add_argument("--packages", default="", help="comma-separated installed packages whose documentation is added")
    ap.add_argument("--no-stdlib", action="store_true",
                    help="the packages' documentation only (a corpus the standard library's surrogates never saw)")
    args = ap.parse_args()
    if args.no_stdlib and not args.packages:
        raise SystemExit("--no-stdlib needs --packages")
    names = [] if args.no_stdlib else sorted(
        m.name for m in pkgutil.iter_modules() if m.module_finder.path.startswith(sys.base_prefix)
        and "site-packages" not in m.module_finder.path and not m.name.startswith(SKIP))
    for package in filter(None, args.packages.split(",")):
        names += package_modules(package.strip())
    args.out.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in names:
        try:
            text = module_docs(name)
        except Exception:  # noqa: BLE001 - modules that need a platform or a display
            continue
        for i, piece in enumerate(pieces(text, args.chars)):
            (args.out / f"{name}-{i:03d}.txt").write_text(piece + "\n")
            n += 1
    print(f"wrote {n} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
