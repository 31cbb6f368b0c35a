#!/usr/bin/env python
"""The OpenAI mode of scripts/bench_serve.py: NVIDIA's AIPerf against the OpenAI-compatible server.

For the dense cache and each threshold, one server (the serving EngineLoop and the OpenAI front
of `kvzap-trt serve --openai-port`, in this process) with the SAME KV pool, sized to hold
`--budget-seqs` requests uncompressed; against it, `aiperf profile` (streaming completions,
synthetic prompts of `--prompt-tokens` tokens from SmolLM2's tokenizer, `--new-tokens` out) at
each `--concurrency`. Records AIPerf's output-token throughput, time to first token and
inter-token latency, and, sampled from the engine while AIPerf runs, the peak number of
sequences running at once and the mean compression of the running requests. Prints a table,
writes bench/results/serve-openai-<date>.json (with the resolved config and AIPerf's command)
and a PNG.

AIPerf pins its own dependencies: install it in a separate environment and name it with
--aiperf (default: `aiperf` on PATH):

    python3 -m venv /tmp/aiperf && /tmp/aiperf/bin/pip install aiperf
    .venv/bin/python scripts/bench_serve.py --openai --aiperf /tmp/aiperf/bin/aiperf
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tqdm import tqdm

from kvzap_trt import bench
from kvzap_trt.config import resolve_config
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.serve.engine_loop import EngineLoop
from kvzap_trt.serve.openai_api import OpenAIServer

MODEL = "smollm2-135m"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--openai", action="store_true", help="(the flag that selects this mode in bench_serve.py)")
    ap.add_argument("--aiperf", default=None, help="the aiperf executable (default: aiperf on PATH)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--requests", type=int, default=48, help="requests per AIPerf run")
    ap.add_argument("--prompt-tokens", type=int, default=384)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--budget-seqs", type=int, default=8, help="KV pool = this many requests held uncompressed")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.2])
    ap.add_argument("--surrogate", default="random:linear:0",
                    help="surrogate (default: seeded random weights, as scripts/bench_serve.py)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    return ap.parse_args(argv)


class EngineSampler:
    """Peak running sequences and the mean compression of the running requests, sampled from
    the EngineLoop's per-step metrics every 20 ms while a run lasts."""

    def __init__(self, loop: EngineLoop):
        self.loop, self.peak, self.ratios = loop, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            m = self.loop.metrics
            self.peak = max(self.peak, m.running)
            if m.running:
                self.ratios.append(m.compression_ratio)

    def __enter__(self) -> "EngineSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def aiperf_command(aiperf: str, url: str, tokenizer: Path, concurrency: int, args: argparse.Namespace,
                   out_dir: Path) -> list[str]:
    return [aiperf, "profile", "--model", MODEL, "--url", url, "--endpoint-type", "completions", "--streaming",
            "--concurrency", str(concurrency), "--request-count", str(args.requests),
            "--synthetic-input-tokens-mean", str(args.prompt_tokens), "--synthetic-input-tokens-stddev", "0",
            "--output-tokens-mean", str(args.new_tokens), "--output-tokens-stddev", "0",
            "--tokenizer", str(tokenizer), "--use-server-token-count", "--random-seed", "0",
            "--output-artifact-dir", str(out_dir), "--no-auto-plot"]


def run_aiperf(cmd: list[str], out_dir: Path) -> dict:
    """AIPerf's figures of one run: throughput, TTFT, ITL, requests, errors."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    report = out_dir / "profile_export_aiperf.json"
    if done.returncode != 0 or not report.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"aiperf failed (exit {done.returncode}):\n{tail}")
    d = json.loads(report.read_text(encoding="utf-8"))
    stat = lambda name, key="avg": round(d[name][key], 2)  # noqa: E731
    return {"output_tokens_per_s": stat("output_token_throughput"), "requests_per_s": stat("request_throughput"),
            "ttft_ms_p50": stat("time_to_first_token", "p50"), "ttft_ms_avg": stat("time_to_first_token"),
            "itl_ms_p50": stat("inter_token_latency", "p50"), "itl_ms_avg": stat("inter_token_latency"),
            "output_tokens_avg": stat("output_sequence_length"), "requests": int(d["request_count"]["avg"]),
            "error_rate_pct": d.get("error_request_count", {}).get("avg", 0)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    aiperf = args.aiperf or shutil.which("aiperf")
    if not aiperf or not Path(aiperf).exists():
        raise SystemExit("aiperf not found: install it in its own environment (python3 -m venv /tmp/aiperf && "
                         "/tmp/aiperf/bin/pip install aiperf) and pass --aiperf /tmp/aiperf/bin/aiperf")
    base = resolve_config(MODEL, window=args.window, surrogate=args.surrogate, max_seqs=max(args.concurrency))
    machine = bench.machine_info(base.device)
    rt = Runtime.from_config(base)
    spec = rt.make_cache(1, 1, 1).spec
    blocks = args.budget_seqs * spec.prefill_blocks(args.prompt_tokens + args.new_tokens)
    kv_mb = blocks * spec.block_bytes / 2**20
    tokenizer = rt.loaded.model_dir  # tokenizer.json beside the weights: AIPerf needs no download

    rows, commands = [], []
    cases = [(tau, c) for tau in [None] + args.thresholds for c in args.concurrency]
    bar = tqdm(total=len(cases), desc="aiperf runs", file=sys.stderr)
    for tau in [None] + args.thresholds:
        cfg = dataclasses.replace(base, threshold=0.0 if tau is None else tau, kv_cache_mb=kv_mb)
        run = Runtime(cfg, rt.loaded, None if tau is None else rt.surrogate)
        loop = EngineLoop.from_runtime(run).start()
        server = OpenAIServer(loop, MODEL).start()
        try:
            for concurrency in args.concurrency:
                with tempfile.TemporaryDirectory() as tmp:
                    cmd = aiperf_command(aiperf, f"http://{server.host}:{server.port}", tokenizer, concurrency, args,
                                         Path(tmp))
                    t0 = time.perf_counter()
                    with EngineSampler(loop) as sampled:
                        figures = run_aiperf(cmd, Path(tmp))
                    commands.append(" ".join(aiperf_command(aiperf, "http://127.0.0.1:PORT", tokenizer, concurrency,
                                                            args, Path("DIR"))))
                rows.append({"config": "dense" if tau is None else f"tau={tau:+.2f}", "threshold": tau,
                             "concurrency": concurrency, **figures, "peak_running_seqs": sampled.peak,
                             "compression_ratio": round(sum(sampled.ratios) / max(1, len(sampled.ratios)), 4),
                             "seconds": round(time.perf_counter() - t0, 1)})
                bar.update(1)
        finally:
            server.stop()
            loop.stop()
    bar.close()

    print(f"\nSmolLM2-135M on {machine['device']} through the OpenAI front, AIPerf streaming completions, "
          f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens, window {args.window}, one KV pool of "
          f"{kv_mb:.1f} MiB ({args.budget_seqs} requests uncompressed)")
    print(f"{'config':>10} {'conc':>5} {'compr':>6} {'peak seqs':>9} {'out tok/s':>9} {'TTFT p50 ms':>11} "
          f"{'ITL p50 ms':>10}")
    for r in rows:
        print(f"{r['config']:>10} {r['concurrency']:>5} {r['compression_ratio']:>6.1%} {r['peak_running_seqs']:>9} "
              f"{r['output_tokens_per_s']:>9.2f} {r['ttft_ms_p50']:>11.0f} {r['itl_ms_p50']:>10.0f}")

    argv = sys.argv[1:] if argv is None else argv
    script = "bench_serve.py" if "--openai" in argv else "bench_serve_openai.py"  # how it was run
    result = bench.result("serve-openai", script, argv, machine, device=base.device,
                          aiperf_commands=sorted(set(commands)), config=base.to_dict(), kv_pool_mib=round(kv_mb, 2),
                          rows=rows)
    path = bench.write_result(result, args.out)
    plot(rows, path.with_suffix(".png"), kv_mb)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def plot(rows: list[dict], path: Path, kv_mb: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        conc = [r["concurrency"] for r in mine]
        for ax, key in zip(axes, ("output_tokens_per_s", "peak_running_seqs", "ttft_ms_p50")):
            ax.plot(conc, [r[key] for r in mine], "o-", label=config)
    for ax, title in zip(axes, ("output tokens / s (CPU)", "peak running sequences", "time to first token p50 (ms)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("AIPerf concurrency")
        ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M, OpenAI front, one {kv_mb:.0f} MiB KV pool", fontsize=10)
    fig.tight_layout()
    bench.save_plot(fig, path)


if __name__ == "__main__":
    sys.exit(main())
