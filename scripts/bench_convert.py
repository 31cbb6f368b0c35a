#!/usr/bin/env python
"""Conversion speed and memory: `kvzap-trt convert` beside a plain file copy of the same bytes.

On the largest model this machine has locally (SmolLM2-135M in float32, 540 MB: the Hub is out
of reach), in one run: copy the model's safetensors file, then convert at several tp and dtypes,
each in a fresh process that reports its own peak RSS (and a process that only imports, for the
baseline). Peak RSS counts the memory-mapped source pages, which are file-backed and reclaimable;
peak anonymous memory (RssAnon, sampled every 5 ms) is what conversion itself holds. Prints a
table, writes bench/results/convert-<date>.json.

    .venv/bin/python scripts/bench_convert.py
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from kvzap_trt import bench

CASES = [(1, "float32"), (3, "float32"), (1, "bfloat16"), (3, "bfloat16")]


def rss_anon() -> int:
    """Anonymous resident bytes now (memory-mapped model files are file-backed, not counted)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def child(job: str, model_dir: str, out: str, tp: int, dtype: str, queue) -> None:
    import threading

    from kvzap_trt.config import RunConfig
    from kvzap_trt.convert.writer import convert

    peak, done = [rss_anon()], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss_anon())

    threading.Thread(target=sample, daemon=True).start()

    if job == "convert":
        cfg = RunConfig(model=model_dir, surrogate="random:linear:0", dtype=dtype).validate()
        t0 = time.perf_counter()
        convert(cfg, Path(out), tp, dtype)
        seconds = time.perf_counter() - t0
    else:
        seconds = 0.0
    done.set()
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, max(peak[0], rss_anon())))


def in_fresh_process(*args) -> tuple[float, int, int]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(*args, q))
    p.start()
    result = q.get()
    p.join()
    return result


def main() -> int:
    from kvzap_trt.config import load_preset
    from kvzap_trt.models.loading import resolve_model_dir

    model_dir = resolve_model_dir(load_preset("smollm2-135m")["model"])
    src_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    rows = []
    with tempfile.TemporaryDirectory(dir=Path.cwd() / "build" if (Path.cwd() / "build").is_dir() else None) as tmp:
        t0 = time.perf_counter()
        for f in model_dir.glob("*.safetensors"):
            shutil.copyfile(f, Path(tmp) / f.name)
        copy_s = time.perf_counter() - t0
        rows.append({"job": "file copy", "tp": None, "dtype": None, "seconds": round(copy_s, 3),
                     "MBps_read": round(src_bytes / copy_s / 1e6, 1), "peak_rss_MiB": None})
        _, base_rss, base_anon = in_fresh_process("baseline", str(model_dir), "", 1, "float32")
        for tp, dtype in CASES:
            out = Path(tmp) / f"ckpt-{tp}-{dtype}"
            seconds, rss, anon = in_fresh_process("convert", str(model_dir), str(out), tp, dtype)
            written = sum(f.stat().st_size for f in out.glob("rank*.safetensors"))
            rows.append({"job": "convert", "tp": tp, "dtype": dtype, "seconds": round(seconds, 3),
                         "MBps_read": round(src_bytes / seconds / 1e6, 1), "bytes_written": written,
                         "peak_rss_MiB": round(rss / 2**20),
                         "peak_anon_MiB": round(anon / 2**20), "peak_anon_over_baseline_MiB": round((anon - base_anon) / 2**20)})
            shutil.rmtree(out)

    machine = bench.machine_info()
    print(f"\nSmolLM2-135M float32 safetensors, {src_bytes / 1e6:.0f} MB, {machine['cpu']}, {machine['cores']} cores; "
          f"baseline process (imports only) {base_rss / 2**20:.0f} MiB RSS, {base_anon / 2**20:.0f} MiB anonymous")
    print(f"{'job':>10} {'tp':>3} {'dtype':>9} {'seconds':>8} {'MB/s read':>10} {'x copy':>7} {'peak RSS MiB':>13} "
          f"{'peak anon MiB':>14}")
    for r in rows:
        ratio = rows[0]["seconds"] / r["seconds"] if r["seconds"] else 0
        print(f"{r['job']:>10} {r['tp'] or '':>3} {r['dtype'] or '':>9} {r['seconds']:>8.2f} {r['MBps_read']:>10.1f} "
              f"{ratio:>7.2f} {r['peak_rss_MiB'] or '':>13} {r.get('peak_anon_MiB') or '':>14}")
    result = bench.result("convert", "bench_convert.py", [], machine,
                          model="SmolLM2-135M-Instruct (dequantised Q4_1 GGUF, float32)", source_bytes=src_bytes,
                          baseline_rss_MiB=round(base_rss / 2**20), baseline_anon_MiB=round(base_anon / 2**20), rows=rows)
    path = bench.write_result(result, Path("bench/results"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
