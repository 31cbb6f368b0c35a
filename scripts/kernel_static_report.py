#!/usr/bin/env python
"""Static report of the attention kernel's hot loop from its sm_90a SASS (no GPU needed).

For every instance in libkvzap_kernels.so of attention_kernel<T, D, G> (fp32, CUDA cores) and
attention_mma_kernel<T, D, false> (bf16 / fp16, tensor cores; reported once per group size 1, 2,
4, 8, which all run it) and attention_mma_kernel<T, D, true> (its packed launch for prompt rows,
keyed `attention_packed.<dtype>_d<D>`): the hot loop (the backward branch whose body holds the most FFMA, or HMMA for
the tensor-core kernel: the per-key loop), its SASS instructions, the K/V bytes one warp moves
per trip (fp32: TY keys x kUnroll x D x 2 tensors x elem bytes; mma: 16-key tiles counted from
the loop's HMMA), instructions per KiB moved, registers, stack (spills) and the resident blocks
per SM the registers allow. Prints a table and writes bench/results/kernel-static-<date>.json keyed
`attention.<dtype>_d<D>_g<G>`.

    cmake -S plugins -B build/plugins -DCMAKE_CUDA_ARCHITECTURES=90a && cmake --build build/plugins -j
    .venv/bin/python scripts/kernel_static_report.py --lib build/plugins/libkvzap_kernels.so

cuobjdump and nvdisasm come from the PyPI wheels nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm
(the dev extra), or PATH. tests/test_kernel_static.py holds the budget CI enforces.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kvzap_trt import bench

SOURCE = Path(__file__).resolve().parents[1] / "plugins" / "src" / "paged_attention.cu"
ELEM_BYTES = {"__nv_bfloat16": 2, "__half": 2, "f": 4}
DTYPE_NAMES = {"__nv_bfloat16": "bf16", "__half": "fp16", "f": "fp32"}
# attention_kernel<T, D, GMAX> (fp32, CUDA cores) and attention_mma_kernel<T, D> (bf16/fp16, tensor
# cores, every group up to 8 heads)
INSTANCE = re.compile(r"attention_kernelI(13__nv_bfloat16|6__half|f)Li(\d+)ELi(\d+)E")
MMA_INSTANCE = re.compile(r"attention_mma_kernelI(13__nv_bfloat16|6__half)Li(\d+)ELb([01])E")
MMA_GROUPS = (1, 2, 4, 8)  # rows reported for an mma instance: the group sizes of the CUDA-core kernel's instances
TILE_KEYS = 16  # kTileKeys of cache_index.cuh
LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def cuda_tool(name: str) -> str:
    """Path of cuobjdump / nvdisasm: the nvidia-cuda-* wheel's, else PATH's."""
    try:
        import nvidia

        for root in nvidia.__path__:
            for found in Path(root).glob(f"cu*/bin/{name}"):
                return str(found)
    except ImportError:
        pass
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    return found


def unroll() -> int:
    """kUnroll of paged_attention.cu (keys per lane per trip)."""
    return int(re.search(r"constexpr int kUnroll = (\d+);", SOURCE.read_text()).group(1))


def sass_functions(lib: Path, arch: str) -> tuple[dict[str, list[tuple[int, str]]], dict[str, dict[str, int]]]:
    """{function: [(address, instruction)]} and {function: {REG, STACK, ...}} of paged_attention's cubin."""
    cuobjdump = cuda_tool("cuobjdump")
    env = dict(os.environ, PATH=f"{Path(cuda_tool('nvdisasm')).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = f"paged_attention.{arch}.cubin"
        subprocess.run([cuobjdump, "-xelf", cubin, str(lib.resolve())], cwd=tmp, check=True, capture_output=True)
        sass = subprocess.run([cuobjdump, "-sass", cubin], cwd=tmp, check=True, capture_output=True, text=True,
                              env=env).stdout
        usage = subprocess.run([cuobjdump, "-res-usage", cubin], cwd=tmp, check=True, capture_output=True,
                               text=True, env=env).stdout
    functions: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in sass.splitlines():
        if "Function :" in line:
            current = line.split("Function :")[1].strip()
            functions[current] = []
        elif current and (m := LINE.search(line)):
            functions[current].append((int(m.group(1), 16), m.group(2)))
    resources = {}
    for name, fields in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", usage):
        resources[name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", fields)}
    return functions, resources


def count(body: list[str], op: str) -> int:
    """Instructions of opcode `op` (FFMA, HMMA), predicated or not."""
    return sum(bool(re.match(rf"(@!?U?P\w+\s+)?{op}\b", t)) for t in body)


def hot_loop(code: list[tuple[int, str]], op: str = "FFMA") -> list[str]:
    """Instructions of the backward-branch loop (`[@P] BRA <earlier address>`) with the most `op`
    (FFMA for the CUDA-core kernel, HMMA for the tensor-core one). Its body is taken as the address
    range from the target to the branch, inner code included."""
    def ffma(body: list[str]) -> int:
        return count(body, op)

    best: list[str] = []
    for address, text in code:
        m = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", text)
        if not m or int(m.group(1), 16) >= address:
            continue
        start = int(m.group(1), 16)
        body = [t for a, t in code if start <= a <= address]
        if ffma(body) > ffma(best):
            best = body
    return best


def report(lib: Path, arch: str = "sm_90a") -> dict[str, dict]:
    functions, resources = sass_functions(lib, arch)
    kunroll, out = unroll(), {}
    for name, code in functions.items():
        if m := INSTANCE.search(name):
            dtype, D, groups = m.group(1).lstrip("0123456789"), int(m.group(2)), (int(m.group(3)),)
            elem = ELEM_BYTES[dtype]
            keys_per_trip = (32 // (D // (16 // elem))) * kunroll  # TY keys per warp step x kUnroll
            loop, op, kernel = hot_loop(code), "FFMA", f"attention_kernel<{DTYPE_NAMES[dtype]}, {D}, {groups[0]}>"
        elif m := MMA_INSTANCE.search(name):
            dtype, D, packed = m.group(1).lstrip("0123456789"), int(m.group(2)), m.group(3) == "1"
            elem = ELEM_BYTES[dtype]
            loop, op = hot_loop(code, "HMMA"), "HMMA"
            kernel = f"attention_mma_kernel<{DTYPE_NAMES[dtype]}, {D}, {'true' if packed else 'false'}>"
            # QK^T: 2 n-tiles x D/16 k-steps; PV: D/16 m-tiles per mma row half in use (the packed
            # kernel's 16 query rows use both), twice in bf16 (P split in two parts)
            pv = (2 if dtype == "__nv_bfloat16" else 1) * (2 if packed else 1)
            hmma_per_tile = (2 + pv) * (D // 16)
            keys_per_trip = count(loop, "HMMA") // hmma_per_tile * TILE_KEYS
            groups = ("packed",) if packed else MMA_GROUPS
        else:
            continue
        kib = keys_per_trip * D * elem * 2 / 1024  # K and V
        res = resources.get(name, {})
        regs = res.get("REG", 0)
        for G in groups:
            key = f"attention_packed.{DTYPE_NAMES[dtype]}_d{D}" if G == "packed" else f"attention.{DTYPE_NAMES[dtype]}_d{D}_g{G}"
            out[key] = {
                "kernel": kernel,
                "hot_loop_instructions": len(loop),
                "math_op": op,
                "math_instructions": count(loop, op),
                "kib_per_trip": kib,
                "instructions_per_kib": round(len(loop) / kib, 1),
                "registers": regs,
                "stack_bytes": res.get("STACK", 0),
                "resident_blocks_per_sm": 65536 // (max(regs, 1) * 128),
            }
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", type=Path, required=True, help="libkvzap_kernels.so built for sm_90a (CMake)")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    rows = report(args.lib, args.arch)
    if not rows:
        raise SystemExit(f"no attention_kernel instance for {args.arch} in {args.lib}")
    print(f"{'instance':<28}{'loop instr':>11}{'math':>11}{'KiB/trip':>9}{'instr/KiB':>10}{'regs':>6}{'stack':>6}{'blocks/SM':>10}")
    for key, r in rows.items():
        math = f"{r['math_instructions']} {r['math_op']}"
        print(f"{key:<28}{r['hot_loop_instructions']:>11}{math:>11}{r['kib_per_trip']:>9.1f}"
              f"{r['instructions_per_kib']:>10}{r['registers']:>6}{r['stack_bytes']:>6}{r['resident_blocks_per_sm']:>10}")
    result = bench.result("kernel_static", "kernel_static_report.py", argv, bench.machine_info(), arch=args.arch,
                          kernels=rows)
    path = bench.write_result(result, args.out, "kernel-static")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
