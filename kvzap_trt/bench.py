"""The benchmarks' shared harness: the record every scripts/bench_*.py writes, and how.

A result is one JSON object, bench/results/<stem>-<date>.json: `benchmark` (its name), `date`,
`command` (the script and its arguments as run), `machine` (what ran it: `machine_info`), then
the script's own keys. Its plot is the same path with .png. Both are written whole or not at all
(kvzap_trt/atomic.py). The scripts keep their cases, tables and plots; timing stays theirs too
(CUDA events on a GPU, wall clocks of whole processes on a CPU).

The KV-CoE research reports (docs/kvcoe/) head themselves the same way (`report_head`), and
`kvzap-trt eval`'s report carries the same `machine`; their file layouts are their own.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from kvzap_trt.atomic import atomic_save_figure, atomic_write_text


def today() -> str:
    return datetime.date.today().isoformat()


def command(script: str, argv: list[str] | None = None) -> str:
    """How a benchmark was run: 'scripts/<script> ARGS' (argv None: this process's own arguments)."""
    return " ".join([f"scripts/{script}", *(sys.argv[1:] if argv is None else argv)])


def module_command(module: str, argv: list[str] | None = None) -> str:
    """How a `python -m` report was run: 'python -m <module> ARGS', shell-quoted (argv None: this
    process's own arguments)."""
    import shlex

    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str = "cpu") -> str:
    """'NVIDIA H100 80GB HBM3' for a CUDA device, '<arch> CPU' otherwise."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU"


def device_slug(name: str) -> str:
    """A device name as a file name part: 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    return name.lower().replace("nvidia ", "").replace(" ", "-")


def machine_info(device: str = "cpu", **extra: Any) -> dict[str, Any]:
    """What ran a benchmark: the device's name, the CPU, cores, the load average when it started,
    Python and torch versions, and `extra` (threads, other library versions)."""
    import torch

    return {"device": device_name(device), "cpu": cpu_name(), "arch": platform.machine(), "cores": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "torch": torch.__version__, **extra}


def report_head(command: str, config: dict[str, Any] | None = None, device: str = "cpu") -> dict[str, Any]:
    """`date`, `command` (as given), `machine` (machine_info, with torch's intra-op threads) and,
    when given, `config`: the head of a research report."""
    import torch

    head = {"date": today(), "command": command, "machine": machine_info(device, threads=torch.get_num_threads())}
    return head if config is None else {**head, "config": config}


def options(args: Any) -> dict[str, Any]:
    """An argparse namespace as JSON-ready options (paths, and lists of them, as strings)."""
    def plain(v: Any) -> Any:
        return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, list) else v

    return {k: plain(v) for k, v in vars(args).items()}


def result(benchmark: str, script: str, argv: list[str] | None, machine: dict[str, Any], **fields: Any) -> dict:
    """The record's common head (`benchmark`, `date`, `command`, `machine`) and the script's fields."""
    return {"benchmark": benchmark, "date": today(), "command": command(script, argv), "machine": machine, **fields}


def write_result(record: dict, out_dir: Path, stem: str | None = None) -> Path:
    """`record` as out_dir/<stem, else its benchmark name>-<date>.json, atomically -> that path."""
    path = Path(out_dir) / f"{stem or record['benchmark']}-{record['date']}.json"
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def save_plot(fig, path: Path, **savefig: Any) -> None:
    """A figure as PNG at `path` (dpi 120 unless `savefig` says otherwise; written whole or not at
    all), then closed."""
    import matplotlib.pyplot as plt

    atomic_save_figure(fig, path, **{"dpi": 120, **savefig})
    plt.close(fig)
