"""`kvzap-trt build`'s Triton repository: two models from one protocol table, one resolved config."""

from __future__ import annotations

import json
import re

import pytest

from kvzap_trt.cli import main
from kvzap_trt.serve.protocol import INPUTS, OUTPUTS
from kvzap_trt.serve.triton_core import config_from_model_args


def test_build_writes_a_loadable_repository(tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["build", "--model", "smollm2-135m", "--threshold", "0.25", "--window", "32",
                 "--model-name", "llm", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "kvzap_config.json", "llm/1/model.py", "llm/config.pbtxt", "llm_stream/1/model.py", "llm_stream/config.pbtxt"]
    front, core = (out / "llm" / "config.pbtxt").read_text(), (out / "llm_stream" / "config.pbtxt").read_text()
    assert "decoupled: false" in front and "decoupled: true" in core
    assert 'key: "core_model" value: { string_value: "llm_stream" }' in front
    for text in (front, core):
        declared = re.findall(r'name: "(\w+)" data_type: (\w+)', text)
        assert declared == [(n, t) for n, (t, _, _) in INPUTS.items()] + [(n, t) for n, (t, _) in OUTPUTS.items()]
        assert "max_batch_size: 64" in text
    # The core model reads back exactly the configuration that was resolved at build time.
    model_config = {"parameters": {"kvzap_config": {"string_value": json.loads(
        re.search(r'key: "kvzap_config" value: \{ string_value: ("(?:[^"\\]|\\.)*") \}', core).group(1))}}}
    cfg = config_from_model_args({"model_config": json.dumps(model_config)})
    assert (cfg.threshold, cfg.window, cfg.preset) == (0.25, 32, "smollm2-135m")
    assert cfg.to_dict() == json.loads((out / "kvzap_config.json").read_text())
    assert "from kvzap_trt.serve.triton_core import TritonPythonModel" in (out / "llm_stream/1/model.py").read_text()


def test_failed_build_leaves_no_directory(tmp_path, monkeypatch, capsys):
    assert main(["build", "--threshold", "nan", "--out", str(tmp_path / "repo")]) == 2
    assert "threshold must be a finite number" in capsys.readouterr().err

    import kvzap_trt.serve.repository as repository

    def broken(name, decoupled, parameters):
        if decoupled:
            raise OSError(28, "No space left on device")
        return "ok"

    monkeypatch.setattr(repository, "model_config", broken)  # fails after the front model is written
    with pytest.raises(OSError, match="No space left on device"):
        main(["build", "--out", str(tmp_path / "repo")])
    assert list(tmp_path.iterdir()) == []
