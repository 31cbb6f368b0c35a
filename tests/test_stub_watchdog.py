"""The stub watchdog (kvzap_trt/serve/stub_watchdog.py): a process whose parent dies ends itself."""

import os
import subprocess
import sys
import time

CHILD = ("from kvzap_trt.serve.stub_watchdog import start_parent_watchdog; import time; "
         "start_parent_watchdog(); print('ready', flush=True); time.sleep(60)")
# The parent starts the child, waits until its watchdog runs (a stub's model initializes while
# tritonserver lives), prints its pid and dies, orphaning it as a killed tritonserver orphans
# its stubs. The child's output goes to the parent, not to this test's pipes.
PARENT = (f"import subprocess, sys, os; p = subprocess.Popen([sys.executable, '-c', {CHILD!r}], "
          "stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True); "
          "assert p.stdout.readline().strip() == 'ready'; print(p.pid, flush=True); os._exit(0)")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_an_orphaned_process_with_the_watchdog_ends_itself():
    out = subprocess.run([sys.executable, "-c", PARENT], capture_output=True, text=True, timeout=60, check=True)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10  # the watchdog polls every second; start-up may take a few
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    still = alive(pid)
    if still:
        os.kill(pid, 9)
    assert not still, "the orphaned child outlived its parent by 10 s"
