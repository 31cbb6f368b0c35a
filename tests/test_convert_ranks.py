"""Every rank of a converted checkpoint, checked by hand against the HF tensors and the
surrogate, without kvzap_trt.convert.layout (whose own inverse would hide a replica rank or an
`fc` rank written wrong): tp 2 and 4, and tp 8 over 4 kv heads (each kv head on two ranks).

Tiny models: 8 q heads, 4 kv heads, head_dim 16, hidden 64, intermediate 128, vocab 160.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kvzap_trt.cli import main
from kvzap_trt.models.loading import load_state_dict
from kvzap_trt.surrogate import Surrogate, save_surrogate
from tests.tiny_models import build_tiny

# tp -> the kv heads each rank holds, written out by hand
KV_HEADS = {
    2: [[0, 1], [2, 3]],
    4: [[0], [1], [2], [3]],
    8: [[0], [0], [1], [1], [2], [2], [3], [3]],
}
D = 16


def rows(t: torch.Tensor, heads: list[int], per_head: int) -> torch.Tensor:
    """The rows of `heads` in a tensor whose rows are grouped `per_head` to a head."""
    return torch.cat([t[h * per_head : (h + 1) * per_head] for h in heads])


def nonzero_surrogate(kind: str, seed: int) -> Surrogate:
    """Random weights and biases (random_surrogate's biases are zero: a wrong bias would pass)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if kind == "linear":
        return Surrogate(r(3, 4, 64), r(3, 4))
    return Surrogate(r(3, 8, 64), r(3, 8), r(3, 4, 8), r(3, 4))


@pytest.mark.parametrize("family,kind", [("llama", "linear"), ("qwen3", "mlp"), ("qwen2", "linear")])
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_every_rank_holds_its_heads(tiny_dirs, tmp_path, family, kind, tp):
    s = nonzero_surrogate(kind, seed=tp)
    save_surrogate(s, tmp_path / "s")
    out = tmp_path / "ckpt"
    assert main(["convert", "--model", str(tiny_dirs[family]), "--surrogate", str(tmp_path / "s"), "--out", str(out),
                 "--tp", str(tp), "--dtype", "float32"]) == 0
    assert json.loads((out / "config.json").read_text())["mapping"]["tp_size"] == tp
    hf = load_state_dict(tiny_dirs[family])
    q_heads = 8 // tp
    for r in range(tp):
        t = load_file(out / f"rank{r}.safetensors")
        kv = KV_HEADS[tp][r]
        for i in range(3):
            a = f"transformer.layers.{i}.attention."
            q, k, v = (hf[f"layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv")
            qkv = t[a + "qkv.weight"]  # [(q_heads + 2 * len(kv)) * D, 64]
            assert torch.equal(qkv[: q_heads * D], q[r * q_heads * D : (r + 1) * q_heads * D]), (r, i, "q")
            assert torch.equal(qkv[q_heads * D : (q_heads + len(kv)) * D], rows(k, kv, D)), (r, i, "k")
            assert torch.equal(qkv[(q_heads + len(kv)) * D :], rows(v, kv, D)), (r, i, "v")
            assert (a + "qkv.bias" in t) == (family == "qwen2")
            if family == "qwen2":  # the biases are cut as the weights' rows
                bq, bk, bv = (hf[f"layers.{i}.self_attn.{p}_proj.bias"] for p in "qkv")
                want = torch.cat([bq[r * q_heads * D : (r + 1) * q_heads * D], rows(bk, kv, D), rows(bv, kv, D)])
                assert torch.equal(t[a + "qkv.bias"], want), (r, i, "bias")
            cut = slice(r * 128 // tp, (r + 1) * 128 // tp)  # o_proj's input and the MLP are both 128 wide
            assert torch.equal(t[a + "dense.weight"], hf[f"layers.{i}.self_attn.o_proj.weight"][:, cut])
            m = f"transformer.layers.{i}.mlp."
            assert torch.equal(t[m + "fc.weight"], hf[f"layers.{i}.mlp.gate_proj.weight"][cut])
            assert torch.equal(t[m + "gate.weight"], hf[f"layers.{i}.mlp.up_proj.weight"][cut])
            assert torch.equal(t[m + "proj.weight"], hf[f"layers.{i}.mlp.down_proj.weight"][:, cut])
            # The surrogate: fc (MLP's first layer) whole on every rank; proj rows of this rank's kv heads.
            if kind == "mlp":
                assert torch.equal(t[a + "kvzap.fc.weight"], s.w1[i]), (r, i)
                assert torch.equal(t[a + "kvzap.fc.bias"], s.b1[i]), (r, i)
                w, b = s.w2[i], s.b2[i]
            else:
                assert a + "kvzap.fc.weight" not in t
                w, b = s.w1[i], s.b1[i]
            assert torch.equal(t[a + "kvzap.proj.weight"], w[kv]), (r, i)
            assert torch.equal(t[a + "kvzap.proj.bias"], b[kv]), (r, i)
        head = hf["embed_tokens.weight"] if family == "qwen3" else hf["lm_head.weight"]  # qwen3 ties them
        assert torch.equal(t["lm_head.weight"], head[r * 160 // tp : (r + 1) * 160 // tp])
        assert torch.equal(t["transformer.vocab_embedding.weight"], hf["embed_tokens.weight"])


def test_tp_neither_dividing_nor_a_multiple_of_the_kv_heads_is_refused(tmp_path, capsys):
    """12 q heads and 4 kv heads: tp 6 divides the q heads but splits kv heads unevenly."""
    model = build_tiny("llama", tmp_path / "m", num_attention_heads=12)
    save_surrogate(nonzero_surrogate("linear", 0), tmp_path / "s")
    code = main(["convert", "--model", str(model), "--surrogate", str(tmp_path / "s"), "--out",
                 str(tmp_path / "ckpt"), "--tp", "6"])
    err = capsys.readouterr().err
    assert code == 2 and "tp 6 neither divides nor is a multiple of the model's 4 kv heads" in err
    assert not (tmp_path / "ckpt").exists()
