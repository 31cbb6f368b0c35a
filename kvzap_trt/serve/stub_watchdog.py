"""A thread that ends a Python-backend stub process once tritonserver, its parent, is gone.

A stub whose tritonserver died (killed, or exited with failure without unloading its models) is
re-parented; without this it can linger until Triton's own checks notice. Both models of the
repository start it in `initialize`, so no stub outlives the server by more than a second.
"""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent(parent: int, period_s: float = 1.0) -> None:
    """Return only by ending the process: polls until this process's parent is no longer `parent`."""
    while os.getppid() == parent:
        time.sleep(period_s)
    os._exit(0)


def start_parent_watchdog() -> threading.Thread:
    """exit_with_parent(current parent) on a daemon thread."""
    thread = threading.Thread(target=exit_with_parent, args=(os.getppid(),), name="kvzap-watchdog", daemon=True)
    thread.start()
    return thread
