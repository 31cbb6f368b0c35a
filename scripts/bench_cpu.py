#!/usr/bin/env python
"""The embedded default against transformers on the same CPU, in one run (issue 12).

SmolLM2-135M in float32, greedy, the same prompts (exact token counts cut from real English:
the standard library's documentation, scripts/bench_text.py) and the same number of new tokens
for every configuration:

    kvzap-tau       kvzap-trt at the preset's tau (`Runtime.from_config`, the engine stepped here)
    kvzap-dense     kvzap-trt with nothing evicted (surrogate None, as `EvictionPolicy` documents)
    hf-dense        transformers `generate(use_cache=True, do_sample=False, min_new_tokens=N)`
    kvzap-nocache   first length only: every token recomputed from scratch over prompt + tokens
                    so far (one-token generations on a fresh cache, nothing evicted)
    hf-nocache      first length only: transformers `use_cache=False`

The last two reproduce the seed experiment "KV caching makes generation ~5x faster"
(gpt2-medium, 1,000 new tokens: 21.7 s with the cache, 107 s without) on our model and machine.
Each configuration runs in its own process (this script with `--one`), so peak RSS and warm-up
(one short untimed generation first) are its own. Per run: prefill seconds (time to first
token), decode tokens/s (the other tokens over the other time), total seconds, peak RSS, KV
bytes (kvzap-trt: `bytes_allocated`; transformers: its cache tensors), compression, and whether
kvzap-dense's greedy tokens equal hf-dense's. Then whole processes (start-up, model load,
tokenisation, generation) on the `--process-length` prompt: `kvzap-trt generate --prompt-file F
--json` at the preset's tau against a transformers script doing the same.

Prints a table, writes bench/results/cpu-<date>.json (with the resolved config) and a PNG.
Prompts longer than the model's context minus the new tokens are cut to fit (8192 -> 8128).

    .venv/bin/python scripts/bench_cpu.py [--lengths 1024 4096 8192] [--new-tokens 64] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from kvzap_trt import bench
from kvzap_trt.atomic import atomic_write_text

CONFIGS = ["kvzap-tau", "kvzap-dense", "hf-dense"]
NOCACHE_CONFIGS = ["kvzap-nocache", "hf-nocache"]  # first length only
PRESET = "smollm2-135m"
WARMUP = (32, 2)  # untimed prompt tokens and new tokens before the timed run
RATIO_KEYS = ("prefill_s", "decode_tok_s", "total_s", "peak_rss_mib", "kv_bytes")  # kvzap-trt / transformers

# The transformers side of the whole-process timing: what a user would write.
HF_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, prompt_file, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
ids = tok(open(prompt_file).read(), return_tensors="pt", add_special_tokens=False).input_ids
with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=True, do_sample=False,
                         max_new_tokens=new_tokens, pad_token_id=tok.eos_token_id)
new = out[0, ids.shape[1]:].tolist()
print(json.dumps({"prompt_tokens": ids.shape[1], "token_ids": new, "text": tok.decode(new, skip_special_tokens=True)}))
"""


def model_dir() -> Path:
    from kvzap_trt.config import load_preset
    from kvzap_trt.models.loading import resolve_model_dir

    return resolve_model_dir(load_preset(PRESET)["model"])


# -- one configuration, in its own process ---------------------------------------------------
def run_kvzap(config: str, prompt: list[int], new_tokens: int) -> dict:
    from kvzap_trt.config import resolve_config
    from kvzap_trt.runtime.generate import Runtime

    cfg = resolve_config(PRESET, max_new_tokens=new_tokens)
    rt = Runtime.from_config(cfg)
    if config != "kvzap-tau":
        rt = Runtime(cfg, rt.loaded, None)  # surrogate None: nothing is ever evicted

    def timed(ids: list[int], n: int) -> tuple[list[int], list[float], dict | None]:
        """Greedy `n` tokens after `ids`; returns tokens, the time of each, the final cache stats."""
        sampling = rt.sampling(max_new_tokens=n, stop_token_ids=())
        if config == "kvzap-nocache":  # prompt + tokens so far, from scratch, for every token
            out, times = [], []
            for _ in range(n):
                out += rt.generate([ids + out], rt.sampling(max_new_tokens=1, stop_token_ids=()))[0].token_ids
                times.append(time.perf_counter())
            return out, times, None
        engine, (req,) = rt.start([ids], sampling)
        times = []
        while engine.has_work():
            engine.step()
            times.append(time.perf_counter())
        return req.output_ids, times, req.kv

    timed(prompt[: WARMUP[0]], WARMUP[1])
    t0 = time.perf_counter()
    tokens, times, kv = timed(prompt, new_tokens)
    return summary(tokens, [t - t0 for t in times],
                   kv and kv["bytes_allocated"], kv["compression_ratio"] if kv else None, cfg.to_dict())


def run_hf(config: str, prompt: list[int], new_tokens: int) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    transformers.logging.set_verbosity_error()

    class StepTimes(BaseStreamer):
        """`generate` puts the prompt once, then every new token as it is chosen."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32).eval()

    def timed(ids: list[int], n: int):
        x = torch.tensor([ids])
        streamer = StepTimes()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), use_cache=config == "hf-dense",
                                 do_sample=False, max_new_tokens=n, min_new_tokens=n, streamer=streamer,
                                 return_dict_in_generate=True, pad_token_id=model.config.eos_token_id)
        return out.sequences[0, len(ids):].tolist(), streamer.times[1:], out.past_key_values

    timed(prompt[: WARMUP[0]], WARMUP[1])
    t0 = time.perf_counter()
    tokens, times, cache = timed(prompt, new_tokens)
    kv_bytes = None if cache is None else cache_bytes(cache)
    return summary(tokens, [t - t0 for t in times], kv_bytes, None if cache is None else 0.0,
                   {"transformers": transformers.__version__, "attn_implementation": model.config._attn_implementation})


def cache_bytes(cache) -> int:
    """Bytes of a transformers cache's tensors (DynamicCache of 4.56+ / 5.x, older lists, or tuples)."""
    if hasattr(cache, "layers"):
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    elif hasattr(cache, "key_cache"):
        tensors = list(cache.key_cache) + list(cache.value_cache)
    else:
        tensors = [t for layer in cache for t in layer]
    return sum(t.numel() * t.element_size() for t in tensors)


def summary(tokens: list[int], times: list[float], kv_bytes: int | None, compression: float | None,
            settings: dict) -> dict:
    """times[i]: seconds from the start until token i was chosen."""
    import torch

    total, ttft = times[-1], times[0]
    decode = (len(tokens) - 1) / (total - ttft) if len(tokens) > 1 else None
    return {"prefill_s": round(ttft, 4), "decode_tok_s": decode and round(decode, 3), "total_s": round(total, 4),
            "new_tokens": len(tokens), "kv_bytes": kv_bytes, "compression_ratio": compression,
            "token_ids": tokens, "torch_threads": torch.get_num_threads(), "settings": settings}


# -- the parent: prompts, child processes, table, files ---------------------------------------
def run_child(cmd: list[str], desc: str, threads: int | None) -> tuple[str, float, float]:
    """Run `cmd` (with `threads` intra-op threads); returns its stdout, wall seconds and its own
    peak RSS in MiB. Exits on failure."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if p.returncode != 0:
            sys.exit(f"{desc} failed (exit {p.returncode}):\n{err.read().decode(errors='replace')[-4000:]}")
        return out.read().decode(), wall, usage.ru_maxrss / 1024  # ru_maxrss: KiB on Linux


def prompts(lengths: list[int], new_tokens: int) -> tuple[dict[int, list[int]], int]:
    """Exact-length prompts: prefixes of the standard library's documentation, in the model's tokens."""
    from bench_text import long_text  # scripts/ is on sys.path when a script runs
    from transformers import AutoTokenizer

    d = model_dir()
    ids = AutoTokenizer.from_pretrained(d).encode(long_text(), add_special_tokens=False)
    context = json.loads((d / "config.json").read_text())["max_position_embeddings"]
    out = {}
    for n in lengths:
        m = min(n, context - new_tokens)
        if len(ids) < m:
            raise SystemExit(f"the documentation text has only {len(ids)} tokens, fewer than {m}")
        out[n] = ids[:m]
    return out, context


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def ratio(a, b) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def whole_process(tmp: Path, prompt: list[int], new_tokens: int, threads: int | None) -> list[dict]:
    """Command to exit, fresh processes: kvzap-trt's CLI at the preset's tau, and transformers."""
    from transformers import AutoTokenizer

    d = model_dir()
    f = tmp / "prompt.txt"
    f.write_text(AutoTokenizer.from_pretrained(d).decode(prompt))
    cli = str(Path(sys.executable).parent / "kvzap-trt")
    jobs = {"kvzap-trt generate": [cli, "generate", "--model", PRESET, "--prompt-file", str(f),
                                   "--max-new-tokens", str(new_tokens), "--json"],
            "transformers script": [sys.executable, "-c", HF_SCRIPT, str(d), str(f), str(new_tokens)]}
    rows = []
    for name, cmd in tqdm(jobs.items(), desc="whole processes", file=sys.stderr):
        out, wall, rss = run_child(cmd, name, threads)
        res = json.loads(out.strip().splitlines()[-1])
        rows.append({"job": name, "wall_s": round(wall, 3), "peak_rss_mib": round(rss, 1),
                     "prompt_tokens": res["prompt_tokens"], "new_tokens": len(res["token_ids"]),
                     "token_ids": res["token_ids"], "command": " ".join("<HF_SCRIPT>" if a == HF_SCRIPT else a
                                                                       for a in cmd)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192], help="prompt lengths in tokens")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--process-length", type=int, default=4096, help="prompt length of the whole-process timing")
    ap.add_argument("--no-nocache", action="store_true", help="skip the no-cache runs (first length)")
    ap.add_argument("--threads", type=int, help="intra-op threads of every process (OMP_NUM_THREADS; default: "
                    "torch's choice). On a loaded machine 1 avoids OpenMP's collapse when threads outnumber free cores")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: a 256-token prompt, 8 new tokens, no no-cache runs (under a minute)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--one", choices=CONFIGS + NOCACHE_CONFIGS, help=argparse.SUPPRESS)  # child process
    ap.add_argument("--prompt-ids", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.one:
        prompt = json.loads(args.prompt_ids.read_text())
        run = run_hf if args.one.startswith("hf") else run_kvzap
        atomic_write_text(args.result, json.dumps(run(args.one, prompt, args.new_tokens)))
        return 0

    if args.quick:
        args.lengths, args.new_tokens, args.process_length, args.no_nocache = [256], 8, 256, True
    import transformers

    info = bench.machine_info(threads=args.threads, transformers=transformers.__version__)
    by_length, context = prompts(sorted(set(args.lengths + [args.process_length])), args.new_tokens)
    jobs = [(n, c) for n in args.lengths for c in CONFIGS]
    if not args.no_nocache:
        jobs += [(args.lengths[0], c) for c in NOCACHE_CONFIGS]

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_cpu-") as tmp:
        tmp = Path(tmp)
        for n, config in tqdm(jobs, desc="configurations", file=sys.stderr):
            ids_file, result = tmp / f"prompt-{n}.json", tmp / f"{config}-{n}.json"
            ids_file.write_text(json.dumps(by_length[n]))
            _, wall, rss = run_child([sys.executable, __file__, "--one", config, "--prompt-ids", str(ids_file),
                                      "--new-tokens", str(args.new_tokens), "--result", str(result)],
                                     f"{config} at {n} tokens", args.threads)
            r = json.loads(result.read_text())
            rows.append({"length": n, "prompt_tokens": len(by_length[n]), "config": config, **r,
                         "peak_rss_mib": round(rss, 1), "process_wall_s": round(wall, 3)})
        procs = whole_process(tmp, by_length[args.process_length], args.new_tokens, args.threads)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    get = {(r["length"], r["config"]): r for r in rows}
    comparisons = []
    for n in args.lengths:
        hf, dense, tau = get[n, "hf-dense"], get[n, "kvzap-dense"], get[n, "kvzap-tau"]
        mismatch = first_mismatch(dense["token_ids"], hf["token_ids"])
        comparisons.append({
            "length": n, "tokens_match_dense": mismatch is None, "first_mismatch": mismatch,
            "tau_tokens_match_dense": first_mismatch(tau["token_ids"], hf["token_ids"]) is None,
            **{f"{c}_over_hf_{k}": ratio(get[n, c][k], hf[k]) for c in ("kvzap-tau", "kvzap-dense") for k in RATIO_KEYS}})
    nocache = None
    if not args.no_nocache:
        n = args.lengths[0]
        nocache = {"length": n, "new_tokens": args.new_tokens,
                   "hf_nocache_over_cache_total": ratio(get[n, "hf-nocache"]["total_s"], get[n, "hf-dense"]["total_s"]),
                   "kvzap_nocache_over_cache_total": ratio(get[n, "kvzap-nocache"]["total_s"],
                                                           get[n, "kvzap-dense"]["total_s"]),
                   "kvzap_nocache_over_hf_nocache_total": ratio(get[n, "kvzap-nocache"]["total_s"],
                                                                get[n, "hf-nocache"]["total_s"]),
                   "hf_nocache_tokens_match_dense":
                       first_mismatch(get[n, "hf-nocache"]["token_ids"], get[n, "hf-dense"]["token_ids"]) is None,
                   "kvzap_nocache_tokens_match_dense":
                       first_mismatch(get[n, "kvzap-nocache"]["token_ids"], get[n, "kvzap-dense"]["token_ids"]) is None}
    process = {"prompt_length": args.process_length, "rows": procs,
               "kvzap_over_hf_wall": ratio(procs[0]["wall_s"], procs[1]["wall_s"]),
               "tokens_match": procs[0]["token_ids"] == procs[1]["token_ids"]}

    print_report(info, rows, comparisons, nocache, process, args.new_tokens, context)

    result = bench.result("cpu", "bench_cpu.py", argv, info, preset=PRESET, new_tokens=args.new_tokens, context=context,
                          rows=rows, comparisons=comparisons, nocache=nocache, whole_process=process)
    path = bench.write_result(result, args.out, "cpu-quick" if args.quick else "cpu")
    plot(rows, path.with_suffix(".png"), info, args.new_tokens)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def print_report(info: dict, rows: list[dict], comparisons: list[dict], nocache: dict | None, process: dict,
                 new_tokens: int, context: int) -> None:
    cut = f"; prompts cut to the context {context} minus {new_tokens}" if any(r["length"] > r["prompt_tokens"]
                                                                           for r in rows) else ""
    print(f"\nSmolLM2-135M float32, greedy, {new_tokens} new tokens; {info['cpu']}, {info['cores']} cores, "
          f"{info['threads'] or 'default'} threads; torch {info['torch']}, transformers {info['transformers']}; "
          f"load {info['loadavg_start']} -> {info['loadavg_end']}{cut}")
    print(f"{'prompt':>6} {'config':>13} {'prefill s':>9} {'decode tok/s':>12} {'total s':>8} {'peak RSS MiB':>12} "
          f"{'KV MiB':>7} {'evicted':>7} {'tokens':>6}")
    for r in rows:
        kv = "-" if r["kv_bytes"] is None else f"{r['kv_bytes'] / 2**20:.2f}"
        cr = "-" if r["compression_ratio"] is None else f"{r['compression_ratio']:.1%}"
        dec = "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.2f}"
        print(f"{r['prompt_tokens']:>6} {r['config']:>13} {r['prefill_s']:>9.3f} {dec:>12} {r['total_s']:>8.2f} "
              f"{r['peak_rss_mib']:>12.0f} {kv:>7} {cr:>7} {r['new_tokens']:>6}")
    print("\nkvzap-trt / transformers dense (time: lower is better; decode tok/s: higher is better)")
    print(f"{'prompt':>6} {'config':>12} {'prefill':>8} {'decode tok/s':>12} {'total':>7} {'peak RSS':>8} {'KV bytes':>8}")
    for c in comparisons:
        for name in ("kvzap-tau", "kvzap-dense"):
            cells = ("-" if c[f"{name}_over_hf_{k}"] is None else f"{c[f'{name}_over_hf_{k}']:.2f}x" for k in RATIO_KEYS)
            print(f"{c['length']:>6} {name:>12} " + " ".join(f"{x:>{w}}" for x, w in zip(cells, (8, 12, 7, 8, 8))))
    for c in comparisons:
        where = "" if c["tokens_match_dense"] else f" (first difference at new token {c['first_mismatch']})"
        verdict = "MATCH" if c["tokens_match_dense"] else "DIFFER from"
        print(f"{c['length']}-token prompt: kvzap-dense greedy tokens {verdict} transformers dense{where}; "
              f"kvzap-tau's {'match' if c['tau_tokens_match_dense'] else 'differ'}")
    if nocache:
        print(f"\nno cache vs cache, {nocache['length']}-token prompt, {nocache['new_tokens']} new tokens: "
              f"transformers {nocache['hf_nocache_over_cache_total']}x slower without, kvzap-trt "
              f"{nocache['kvzap_nocache_over_cache_total']}x (seed experiment, gpt2-medium, 1,000 tokens: "
              f"107/21.7 = 4.9x); no-cache kvzap-trt / transformers {nocache['kvzap_nocache_over_hf_nocache_total']}x; "
              f"tokens equal to the cached run's: transformers {nocache['hf_nocache_tokens_match_dense']}, "
              f"kvzap-trt {nocache['kvzap_nocache_tokens_match_dense']}")
    print(f"\nwhole process, {process['prompt_length']}-token prompt (start-up, load, tokenise, generate):")
    for r in process["rows"]:
        print(f"  {r['job']:>20}: {r['wall_s']:7.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
              f"{r['prompt_tokens']} prompt tokens, {r['new_tokens']} new")
    print(f"  kvzap-trt / transformers: {process['kvzap_over_hf_wall']}x (target <= 1.0x); "
          f"tokens {'match' if process['tokens_match'] else 'differ (kvzap-trt evicts at the preset tau)'}")


def plot(rows: list[dict], path: Path, info: dict, new_tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    configs = list(dict.fromkeys(r["config"] for r in rows))
    get = {(r["length"], r["config"]): r for r in rows}
    width = 0.8 / len(configs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "total_s", "total seconds (lower is better)"),
                           (axes[1], "decode_tok_s", "decode tokens / s (higher is better)")):
        for j, c in enumerate(configs):
            xs = [i + (j - (len(configs) - 1) / 2) * width for i, n in enumerate(lengths) if (n, c) in get]
            ys = [get[n, c][key] or 0 for n in lengths if (n, c) in get]
            ax.bar(xs, ys, width, label=c)
        ax.set_xticks(range(len(lengths)), [f"{get[n, configs[0]]['prompt_tokens']} tokens" for n in lengths])
        ax.set_title(title)
        ax.set_yscale("log")  # the no-cache runs are 10-100x away from the others
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M fp32, {new_tokens} new tokens, {info['cpu']} x{info['cores']}, "
                 f"{info['threads'] or 'default'} threads, load {info['loadavg_start'][0]}", fontsize=9)
    fig.tight_layout()
    bench.save_plot(fig, path)


if __name__ == "__main__":
    sys.exit(main())
