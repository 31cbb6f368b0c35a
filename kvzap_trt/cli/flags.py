"""What the commands share: the one-line usage error, the flags that override a preset (made from
RunConfig's fields, kvzap_trt/config.py), and reading a prompt from a file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import NoReturn

from kvzap_trt.config import RunConfig, resolve_config
from kvzap_trt.errors import KvzapError

# RunConfig fields that are flags (those declared with config.flag), by name.
CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig) if "help" in f.metadata}

# The groups commands take. EVICTION: what every command that runs the model takes.
EVICTION = ("model", "surrogate", "threshold", "window", "compress_decoding", "block_size", "device", "dtype",
            "max_num_tokens")
SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
SERVING = ("max_seqs", "kv_cache_mb")
REASONING = ("probe", "fast_max_new_tokens")

_TYPES = {"str": str, "int": int, "float": float}


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _absolute(path: str) -> str:
    return str(Path(path).resolve())


def flag_name(name: str) -> str:
    """The flag of RunConfig field `name`: --kv-cache-mb; --no-compress-decoding for a switch."""
    return CONFIG_FIELDS[name].metadata.get("switch") or "--" + name.replace("_", "-")


def add_config_flags(p: argparse.ArgumentParser, names: tuple[str, ...] = EVICTION) -> None:
    """One flag per RunConfig field in `names`, default None (not given: the preset's value, then the
    dataclass default): the third layer of the configuration. The parser remembers which fields it
    took (`config_fields`), so a command's own flag of the same name (probe train's --seed)
    never reaches the config."""
    p.set_defaults(config_fields=(p.get_default("config_fields") or ()) + tuple(names))
    for name in names:
        meta = CONFIG_FIELDS[name].metadata
        if "switch" in meta:  # a bool that is on unless the flag is given
            p.add_argument(meta["switch"], dest=name, action="store_false", default=None, help=meta["help"])
            continue
        kind = _absolute if meta.get("path") else _TYPES[CONFIG_FIELDS[name].type.split(" |")[0]]
        p.add_argument(flag_name(name), type=kind, default=None, help=meta["help"],
                       **({"choices": meta["choices"]} if "choices" in meta else {}))


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The resolved RunConfig: defaults, the preset named by --model, then every config flag given."""
    fields = getattr(args, "config_fields", ())
    given = {k: getattr(args, k) for k in fields if k != "model"}
    return resolve_config(getattr(args, "model", None) if "model" in fields else None, **given)


def config_argv(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """The config flags among `names` that were given, as a command line again."""
    argv: list[str] = []
    for name in names:
        value = getattr(args, name, None)
        if value is None:
            continue
        if "switch" in CONFIG_FIELDS[name].metadata:
            argv += [] if value else [flag_name(name)]
        else:
            argv += [flag_name(name), str(value)]
    return argv


def add_prompt_flags(p: argparse.ArgumentParser, what: str) -> argparse._MutuallyExclusiveGroup:
    """--prompt TEXT | --prompt-file FILE, one of them required: `what` the text is ("the
    prompt"). Returns the group, for a command's other sources (--prompt-ids-file, --jsonl)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help=what)
    src.add_argument("--prompt-file", type=Path, help=f"file whose whole content is {what}")
    return src


def prompt_text(args: argparse.Namespace) -> str | None:
    """The text of --prompt or --prompt-file (None: neither was given); an empty one is an error."""
    text = args.prompt if args.prompt is not None else read_text(args.prompt_file) if args.prompt_file else None
    if text is not None and not text.strip():
        raise KvzapError("the prompt is empty")
    return text


def read_prompt_ids(path: Path) -> list[int]:
    try:
        ids = json.loads(path.read_text())
    except OSError as e:
        raise KvzapError(f"cannot read prompt ids file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise KvzapError(f"prompt ids file {path} is not JSON: {e}") from None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise KvzapError(f"prompt ids file {path} must hold a JSON list of integers")
    return ids


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise KvzapError(f"cannot read prompt file {path}: {getattr(e, 'strerror', None) or e}") from None


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Each named integer option must be >= 1 or unset (a KvzapError naming the flag otherwise)."""
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise KvzapError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
