"""scripts/compare_surrogates.py: ranks the surrogate that predicts a dataset's scores above one
that does not, reports figures that mean what they say, refuses a surrogate of another model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kvzap_trt.surrogate import random_surrogate, save_surrogate
from kvzap_trt.train.fit import train_surrogate
from tests.test_train import corpus, planted_dataset, tiny_with_tokenizer  # noqa: F401 - fixtures

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_surrogates.py"


def load_script():
    spec = importlib.util.spec_from_file_location("compare_surrogates", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a tiny model's dataset of 24 texts and a ridge fit: seconds
def test_the_surrogate_that_learnt_the_scores_ranks_first(tiny_with_tokenizer, corpus, tmp_path, capsys):  # noqa: F811
    loaded, ds = planted_dataset(tiny_with_tokenizer, corpus, tmp_path / "ds")
    m = loaded.config
    fitted, _ = train_surrogate(ds, "linear", l2=1e-6)
    save_surrogate(fitted, tmp_path / "fitted")
    save_surrogate(random_surrogate("linear", m.num_layers, m.hidden_size, m.num_kv_heads, seed=3), tmp_path / "random")

    script = load_script()
    argv = ["--dataset", str(tmp_path / "ds"), "--surrogate", str(tmp_path / "fitted"), "--surrogate",
            str(tmp_path / "random"), "--out", str(tmp_path / "out"), "--compressions", "0.5,0.9"]
    assert script.main(argv) == 0
    (path,) = (tmp_path / "out").glob("surrogates-*.json")
    assert path.with_suffix(".png").is_file()
    fit_row, rand_row = json.loads(path.read_text())["rows"]
    assert fit_row["surrogate"].endswith("fitted") and fit_row["texts"] == 3  # every 10th of 24: the held-out texts
    assert fit_row["r2_mean"] > 0.99 and rand_row["r2_mean"] < 0.5
    for fit_c, rand_c in zip(fit_row["by_compression"], rand_row["by_compression"]):
        assert fit_c["keeps_of_oracle"] > 0.97 and fit_c["keeps_of_oracle"] > rand_c["keeps_of_oracle"] + 0.1
        assert fit_c["random"] == pytest.approx(1 - fit_c["compression"])
    # tau is where the surrogate evicts that share of the pairs: check it on the scores themselves.
    from kvzap_trt.train.report import held_out

    pred, _ = held_out(ds, fitted)
    for c in fit_row["by_compression"]:
        assert float((pred < c["tau"]).float().mean()) == pytest.approx(c["compression"], abs=0.01)
    assert "fitted" in capsys.readouterr().out

    # --split all reads the training texts too.
    assert script.main([*argv[:4], "--split", "all", "--out", str(tmp_path / "all")]) == 0
    (row,) = json.loads(next((tmp_path / "all").glob("*.json")).read_text())["rows"]
    assert row["texts"] == 24 and row["pairs"] > fit_row["pairs"]

    # A surrogate of another model is refused by name; nothing is written.
    save_surrogate(random_surrogate("linear", m.num_layers + 1, m.hidden_size, m.num_kv_heads), tmp_path / "other")
    with pytest.raises(SystemExit, match="does not fit dataset"):
        script.main(["--dataset", str(tmp_path / "ds"), "--surrogate", str(tmp_path / "other"), "--out",
                     str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="strictly between 0 and 1"):
        script.main([*argv[:4], "--compressions", "0.5,1", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
