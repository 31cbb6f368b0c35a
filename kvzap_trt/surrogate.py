"""KVzap surrogates in NVIDIA's released format.

On disk (Hugging Face `nvidia/KVzap-{linear,mlp}-<model>`): `config.json` with `input_dim,
output_dim, n_modules, hidden_dim` (null for linear) and safetensors tensors
`layers.{i}.weight|bias` (linear) or `layers.{i}.0.weight|bias`, `layers.{i}.2.weight|bias`
(MLP: Linear, GELU, Linear). In memory the per-layer tensors are stacked:
  w1: [L, H1, d]  b1: [L, H1]  w2: [L, Hkv, H1] | None  b2: [L, Hkv] | None
with H1 = Hkv for the linear kind and H1 = hidden_dim for the MLP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kvzap_trt.atomic import atomic_dir
from kvzap_trt.errors import KvzapError
from kvzap_trt.hub import hub_snapshot, looks_like_hub_id
from kvzap_trt.models.config import ModelConfig
from kvzap_trt.tensor_files import read_safetensors_dir


@dataclass
class Surrogate:
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    source: str = ""

    @property
    def kind(self) -> str:
        return "linear" if self.w2 is None else "mlp"

    @property
    def n_modules(self) -> int:
        return self.w1.shape[0]

    @property
    def input_dim(self) -> int:
        return self.w1.shape[2]

    @property
    def output_dim(self) -> int:
        return (self.w1 if self.w2 is None else self.w2).shape[1]

    @property
    def hidden_dim(self) -> int | None:
        return None if self.w2 is None else self.w1.shape[1]

    def score(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, d] entering self_attn of `layer` -> log-scores [N, Hkv] float32."""
        from kvzap_trt.ops.dispatch import ops

        w2 = None if self.w2 is None else self.w2[layer]
        b2 = None if self.b2 is None else self.b2[layer]
        return ops(hidden.device).surrogate_score(hidden, self.w1[layer], self.b1[layer], w2, b2)

    def to(self, device: torch.device | str) -> "Surrogate":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Surrogate(move(self.w1), move(self.b1), move(self.w2), move(self.b2), self.source)

    def validate(self, cfg: ModelConfig, model_name: str = "the model") -> "Surrogate":
        """One-line errors naming both sides when this surrogate does not fit `cfg`."""
        checks = [
            ("layers", self.n_modules, cfg.num_layers),
            ("input dim", self.input_dim, cfg.hidden_size),
            ("kv heads", self.output_dim, cfg.num_kv_heads),
        ]
        for what, mine, theirs in checks:
            if mine != theirs:
                raise KvzapError(
                    f"surrogate {self.source} has {mine} {what} but {model_name} has {theirs}"
                )
        for name in ("w1", "b1", "w2", "b2"):
            t = getattr(self, name)
            if t is not None and not torch.isfinite(t).all():
                raise KvzapError(f"surrogate {self.source} has non-finite values in {name}")
        return self


def random_surrogate(kind: str, n_layers: int, input_dim: int, output_dim: int, seed: int = 0) -> Surrogate:
    """Random weights (scores ~ N(0, mean h^2)), for tests and as a placeholder surrogate."""
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        w1 = torch.randn(n_layers, output_dim, input_dim, generator=g) / input_dim**0.5
        return Surrogate(w1, torch.zeros(n_layers, output_dim), source=f"random:linear:{seed}")
    if kind == "mlp":
        hidden = max(input_dim // 8, 1)
        w1 = torch.randn(n_layers, hidden, input_dim, generator=g) / input_dim**0.5
        w2 = torch.randn(n_layers, output_dim, hidden, generator=g) / hidden**0.5
        return Surrogate(
            w1, torch.zeros(n_layers, hidden), w2, torch.zeros(n_layers, output_dim), source=f"random:mlp:{seed}"
        )
    raise KvzapError(f"surrogate kind must be linear or mlp, got {kind!r}")


def _tensor_names(kind: str, i: int) -> dict[str, str]:
    if kind == "linear":
        return {"w1": f"layers.{i}.weight", "b1": f"layers.{i}.bias"}
    return {
        "w1": f"layers.{i}.0.weight",
        "b1": f"layers.{i}.0.bias",
        "w2": f"layers.{i}.2.weight",
        "b2": f"layers.{i}.2.bias",
    }


def read_surrogate_dir(path: Path) -> Surrogate:
    """Read the released format from a local directory."""
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
        n, hidden = int(cfg["n_modules"]), cfg.get("hidden_dim")
        in_dim, out_dim = int(cfg["input_dim"]), int(cfg["output_dim"])
    except OSError as e:
        raise KvzapError(f"cannot read surrogate config {cfg_path}: {e.strerror}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise KvzapError(f"surrogate config {cfg_path} is malformed: {e}") from None
    tensors = read_safetensors_dir(path, "surrogate")
    kind = "linear" if hidden is None else "mlp"
    h1 = out_dim if hidden is None else int(hidden)
    shapes = {"w1": (h1, in_dim), "b1": (h1,), "w2": (out_dim, h1), "b2": (out_dim,)}
    stacked: dict[str, list[torch.Tensor]] = {}
    for i in range(n):
        for key, name in _tensor_names(kind, i).items():
            if name not in tensors:
                raise KvzapError(f"surrogate {path} lacks tensor {name}")
            t = tensors[name]
            if tuple(t.shape) != shapes[key]:
                raise KvzapError(f"surrogate tensor {name} has shape {tuple(t.shape)}, config implies {shapes[key]}")
            stacked.setdefault(key, []).append(t.float())
    s = {k: torch.stack(v) for k, v in stacked.items()}
    return Surrogate(s["w1"], s["b1"], s.get("w2"), s.get("b2"), source=str(path))


def write_surrogate_files(s: Surrogate, directory: Path) -> None:
    """config.json + model.safetensors of the released format into an existing directory."""
    from safetensors.torch import save_file

    tensors = {}
    for i in range(s.n_modules):
        for key, name in _tensor_names(s.kind, i).items():
            tensors[name] = getattr(s, key)[i].float().contiguous().cpu()
    config = {
        "architectures": ["KVzapModel"],
        "model_type": "kvzap",
        "input_dim": s.input_dim,
        "output_dim": s.output_dim,
        "n_modules": s.n_modules,
        "hidden_dim": s.hidden_dim,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def save_surrogate(s: Surrogate, path: Path) -> None:
    """Write the released format (loadable by kvpress `KVzapModel.from_pretrained`), atomically."""
    with atomic_dir(Path(path)) as tmp:
        write_surrogate_files(s, tmp)


def load_surrogate(spec: str, cfg: ModelConfig, model_name: str = "the model") -> Surrogate:
    """`spec` is a directory, a Hugging Face id or `random:KIND:SEED`; validated against `cfg`."""
    if spec.startswith("random:"):
        try:
            _, kind, seed = spec.split(":")
            seed_int = int(seed)
        except ValueError:
            raise KvzapError(f"random surrogate spec must be random:KIND:SEED, got {spec!r}") from None
        s = random_surrogate(kind, cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, seed_int)
    elif Path(spec).expanduser().is_dir():
        s = read_surrogate_dir(Path(spec).expanduser())
    elif looks_like_hub_id(spec):
        s = read_surrogate_dir(hub_snapshot(spec, ["config.json", "*.safetensors"], "surrogate"))
        s.source = spec
    else:
        raise KvzapError(f"surrogate {spec!r} is not a directory, a Hugging Face id or random:KIND:SEED")
    return s.validate(cfg, model_name)
