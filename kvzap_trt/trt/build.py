"""Build a TensorRT engine from the exported graph (`kvzap-trt export`) with the kvzap plugins.

    onnx parser (plugin nodes -> KvzapVarlenPagedAttention / KvzapEvict of the loaded library)
    -> strongly typed network: every tensor keeps the ONNX graph's type, so a bfloat16 export
       gives a bfloat16 engine (no precision flags: TensorRT 11 has only strongly typed networks)
    -> preview feature ALIASED_PLUGIN_IO_10_03: the plugins' cache outputs alias their inputs
       (IPluginV3OneBuildV2::getAliasedInput), so the pools are updated in place
    -> one optimisation profile per entry of `profiles.engine_profiles` (decode, then prefill)
    -> OUT/model.plan + OUT/engine.json (the export's metadata, limits, profiles, versions),
       written to a temporary directory renamed when complete.

Never run here: no TensorRT and no GPU on the machines this was written on (README).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvzap_trt.atomic import atomic_dir
from kvzap_trt.errors import KvzapError
from kvzap_trt.trt import ENGINE_FILE, ENGINE_META, import_tensorrt, load_plugin_library, trt_logger
from kvzap_trt.trt.profiles import EngineLimits, engine_profiles, graph_inputs


def build_engine(onnx_path: Path, plugin_lib: Path, out: Path, limits: EngineLimits,
                 metadata: dict[str, Any]) -> Path:
    """Parse `onnx_path`, build and write OUT/model.plan; returns its path."""
    trt = import_tensorrt()
    onnx_path, out = Path(onnx_path), Path(out)
    profiles = engine_profiles(graph_inputs(onnx_path), limits)
    logger = trt_logger(trt)
    load_plugin_library(trt, plugin_lib)
    builder = trt.Builder(logger)
    # Strongly typed: a flag in TensorRT 10 (1 << 1), implied in 11, whose deprecated flag is ignored.
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    implied = int(trt.__version__.split(".")[0]) >= 11
    network = builder.create_network(0 if implied or strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: external weights sit beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise KvzapError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(profiles[0][1]):
        raise KvzapError(f"the parsed network's inputs {sorted(names)} differ from the graph's {sorted(profiles[0][1])}")

    config = builder.create_builder_config()
    aliased = getattr(trt.PreviewFeature, "ALIASED_PLUGIN_IO_10_03", None)
    if aliased is not None:  # 10.3 up to 11.1 at least; a later TensorRT that drops the flag should have it on,
        config.set_preview_feature(aliased, True)  # and the plugins refuse to run where outputs are not their inputs
    for profile_name, shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            try:  # the binding raises RuntimeError for shapes out of order or of the wrong rank
                profile.set_shape(name, lo, opt, hi)
            except RuntimeError as e:
                raise KvzapError(f"TensorRT refused the {profile_name} profile's shapes of {name} "
                                 f"(min {lo}, opt {opt}, max {hi}): {e}") from None
        if config.add_optimization_profile(profile) < 0:
            raise KvzapError(f"TensorRT refused the {profile_name} optimisation profile (see its log)")
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise KvzapError(f"TensorRT could not build an engine from {onnx_path} (see TensorRT's log above)")
    meta = {
        **metadata,
        "tensorrt": trt.__version__,
        "onnx": str(onnx_path.resolve()),
        "plugin_lib": str(Path(plugin_lib).resolve()),
        "limits": limits.to_dict(),
        "profiles": [{"name": name, "shapes": {k: [list(s) for s in v] for k, v in shapes.items()}}
                     for name, shapes in profiles],
    }
    with atomic_dir(out) as tmp:
        (tmp / ENGINE_FILE).write_bytes(memoryview(blob))
        (tmp / ENGINE_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out / ENGINE_FILE
