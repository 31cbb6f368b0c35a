"""Write a directory or file completely or not at all: build under a temporary name, then rename."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success it replaces `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    """Write `data` to `final` through a temporary file beside it and a rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(final: Path, text: str) -> None:
    """Write `text` (UTF-8) to `final` through a temporary file beside it and a rename."""
    atomic_write_bytes(final, text.encode())


def atomic_save_figure(fig, final: Path, **savefig_kw) -> None:
    """A matplotlib figure as PNG at `final`, written whole or not at all."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kw)
    atomic_write_bytes(final, buf.getvalue())
