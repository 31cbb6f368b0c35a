"""`kvzap-trt`: the command line, one module per command. Bad input exits with code 2 and one line
on stderr.

flags.py      what the commands share: the one-line usage error, the flags made from RunConfig's
              fields (the configuration's third layer), reading prompts
generate.py   one prompt through the engine            build.py    a Triton repository (+ TensorRT)
convert.py    a TensorRT-LLM checkpoint                export.py   the ONNX graph
score.py      oracle or surrogate scores of a prompt   train.py    a surrogate from a corpus
calibrate.py  tau for a target compression             serve.py    Triton (+ the OpenAI API)
eval.py       accuracy against compression             embed.py    KV-CoE embeddings
probe.py      the fast/slow difficulty probe

Each command module has `add_parser(subparsers)` (its flags, `func` set to its `run`) and imports
what its run needs inside it, so `--help` and bad flags answer before torch or transformers load.
"""

from __future__ import annotations

import importlib
import sys

from kvzap_trt.cli.flags import Parser
from kvzap_trt.errors import KvzapError

# In the order `kvzap-trt --help` lists them.
COMMANDS = ("generate", "build", "convert", "export", "score", "train", "calibrate", "serve", "eval", "embed", "probe")


def build_parser() -> Parser:
    parser = Parser(prog="kvzap-trt", description="KVzap KV-cache pruning with real memory savings.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KvzapError as e:
        print(f"kvzap-trt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
