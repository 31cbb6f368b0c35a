"""The benchmarks' shared harness (kvzap_trt/bench.py): the record's head, its file, the plot."""

from __future__ import annotations

import json
import os
import platform

from kvzap_trt import bench


def test_a_result_names_its_benchmark_date_command_and_machine(tmp_path):
    machine = bench.machine_info(threads=3)
    assert machine["device"] == f"{platform.machine()} CPU" and machine["cores"] == os.cpu_count()
    assert machine["threads"] == 3 and machine["torch"] and machine["cpu"] and len(machine["loadavg_start"]) == 3
    record = bench.result("memory", "bench_memory.py", ["--tokens", "40"], machine, rows=[{"a": 1}])
    assert record["command"] == "scripts/bench_memory.py --tokens 40"
    assert list(record)[:4] == ["benchmark", "date", "command", "machine"] and record["rows"] == [{"a": 1}]

    path = bench.write_result(record, tmp_path / "results")
    assert path == tmp_path / "results" / f"memory-{record['date']}.json"
    assert json.loads(path.read_text()) == record
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left beside it
    named = bench.write_result(record, tmp_path / "results", "memory-quick")
    assert named.name == f"memory-quick-{record['date']}.json"


def test_device_names_become_file_name_parts():
    assert bench.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert bench.device_slug("x86_64 CPU") == "x86_64-cpu"


def test_a_plot_is_written_whole_and_closed(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    bench.save_plot(fig, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_a_research_report_is_headed_like_a_benchmark():
    import argparse
    from pathlib import Path

    import torch

    command = bench.module_command("kvzap_trt.kvcoe.evaluate", ["--out", "a b", "--pieces", "3"])
    assert command == "python -m kvzap_trt.kvcoe.evaluate --out 'a b' --pieces 3"  # quoted: it runs as printed
    head = bench.report_head(command, {"window": 8})
    assert list(head) == ["date", "command", "machine", "config"] and head["date"] == bench.today()
    assert head["machine"]["threads"] == torch.get_num_threads() and head["machine"]["cores"] == os.cpu_count()
    assert "config" not in bench.report_head(command)
    assert bench.options(argparse.Namespace(out=Path("d/x"), n=3)) == {"out": "d/x", "n": 3}
    json.dumps(head)  # JSON-ready
