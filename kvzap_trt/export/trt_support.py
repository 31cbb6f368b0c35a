"""What TensorRT's ONNX parser accepts, checked on a machine without TensorRT.

`parser_problems(model)` lists, one line each, every standard-domain node whose op the parser does
not support with the element types it has in this graph, every input the parser needs constant
that is not, and an opset outside the parser's range. `kvzap-trt build --engine tensorrt` refuses
an ONNX with problems before handing it to TensorRT (or to the container that has it); the tests
run it over the exported graph of every family and dtype.

The table is the parser's support matrix (onnx-tensorrt `docs/operators.md` of TensorRT 10.1, the
newest stored here: later releases add ops and types), for the ops these graphs use and their
likely neighbours. An op outside the table is reported: adding an op to export/graph.py means
reading that page and adding its row here.

Types are read after ONNX shape inference; the plugin nodes' outputs carry value_info from the
export (each has the type of the input it follows, as the plugins' getOutputDataTypes), so types
are known past them. A node whose types stay unknown is reported too.
"""

from __future__ import annotations

from typing import Any

from kvzap_trt.export.plugins import DOMAIN

# The range TensorRT 10.1's matrix states ("opset 9 to opset 20"): conservative, as later releases
# read more (11.x up to 25, NVIDIA's ONNX opset guide); the export writes opset 20.
PARSER_OPSETS = (9, 20)

_F = frozenset({"FLOAT", "FLOAT16", "BFLOAT16"})
_FI = _F | {"INT32", "INT64"}
_FIB = _FI | {"BOOL"}

# op -> the element types its data inputs may have (the matrix's "Supported Types").
SUPPORTED: dict[str, frozenset[str]] = {
    **{op: _F for op in ("Cos", "Sin", "Erf", "Exp", "Floor", "Gelu", "MatMul", "Pow", "Reciprocal", "Sigmoid",
                         "Softmax", "Softplus", "Sqrt", "Tanh", "Einsum", "LayerNormalization")},
    **{op: _FI for op in ("Add", "Sub", "Mul", "Div", "Neg", "Max", "Min", "Mod", "Equal", "Less", "Greater", "Relu",
                          "Range", "TopK", "ReduceMean", "ReduceSum", "ReduceMax", "ScatterND")},
    **{op: _FIB for op in ("Concat", "Expand", "Gather", "GatherElements", "Identity", "Reshape", "Shape", "Slice",
                           "Split", "Squeeze", "Tile", "Transpose", "Unsqueeze", "Where")},
    "Cast": _FIB | {"UINT8"},
    "Not": frozenset({"BOOL"}),
    "ConstantOfShape": _FIB,  # the type of its `value`, checked on its output
}
OUTPUTS_CHECKED = ("Cast", "ConstantOfShape")  # ops whose output type is the one the matrix lists
# Inputs that are indices, shapes, axes or conditions, not data: their types are ONNX's business.
NOT_DATA = {"Gather": (1,), "GatherElements": (1,), "ScatterND": (1,), "Where": (0,), "Reshape": (1,),
            "Expand": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "Split": (1,), "Slice": (1, 2, 3, 4), "Tile": (1,),
            "TopK": (1,), "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,), "ConstantOfShape": (0,)}
# Inputs the parser needs as initializers or Constant outputs ("`axes` must be an initializer").
CONSTANT = {"ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,), "Unsqueeze": (1,), "Squeeze": (1,),
            "Slice": (3,)}


def element_types(model: Any) -> dict[str, str]:
    """{value name: element type name} after ONNX shape inference (inputs, outputs, initializers,
    Constant outputs and every inferred value)."""
    from onnx import TensorProto, shape_inference

    inferred = shape_inference.infer_shapes(model)  # types only matter here; weights are not read
    g = inferred.graph
    types = {v.name: TensorProto.DataType.Name(v.type.tensor_type.elem_type)
             for v in (*g.input, *g.output, *g.value_info) if v.type.tensor_type.elem_type}
    types.update({t.name: TensorProto.DataType.Name(t.data_type) for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            types[n.output[0]] = TensorProto.DataType.Name(n.attribute[0].t.data_type)
    return types


def parser_problems(model: Any, plugin_domain: str = DOMAIN) -> list[str]:
    """One line per thing TensorRT's ONNX parser would refuse in `model` (an onnx.ModelProto; its
    external weights need not be loaded). Nodes of `plugin_domain` are our plugins (their own host
    checks, plugins/trt); a node of any other non-standard domain is a problem: the parser would
    look for a plugin of that name. Empty: nothing this table knows of."""
    problems = []
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and not PARSER_OPSETS[0] <= op.version <= PARSER_OPSETS[1]:
            problems.append(f"opset {op.version}: TensorRT's parser reads opsets {PARSER_OPSETS[0]}-{PARSER_OPSETS[1]}")
    types = element_types(model)
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for n in model.graph.node:
        where = f"{n.name or n.output[0]} ({n.op_type})"
        if n.domain == plugin_domain or n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            continue
        if n.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: domain {n.domain!r} is not ONNX's: TensorRT's parser would need a plugin "
                            f"named {n.op_type}")
            continue
        if n.op_type not in SUPPORTED:
            problems.append(f"{where}: op not in TensorRT's ONNX parser support table (export/trt_support.py)")
            continue
        skip = NOT_DATA.get(n.op_type, ())
        data = dict.fromkeys([x for i, x in enumerate(n.input) if x and i not in skip]
                             + (list(n.output) if n.op_type in OUTPUTS_CHECKED else []))
        for x in data:
            t = types.get(x)
            if t is None:
                problems.append(f"{where}: type of {x!r} unknown after shape inference")
            elif t not in SUPPORTED[n.op_type]:
                problems.append(f"{where}: {x!r} is {t}; the parser takes {', '.join(sorted(SUPPORTED[n.op_type]))}")
        for i in CONSTANT.get(n.op_type, ()):
            if i < len(n.input) and n.input[i] and n.input[i] not in constants:
                problems.append(f"{where}: input {i} ({n.input[i]!r}) must be a constant for TensorRT's parser")
    return problems


def check_for_parser(path) -> None:
    """Raise KvzapError listing what TensorRT's ONNX parser would refuse in the ONNX at `path`
    (its external weights are not read)."""
    import onnx

    from kvzap_trt.errors import KvzapError

    problems = parser_problems(onnx.load(str(path), load_external_data=False))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise KvzapError(f"{path}: TensorRT's ONNX parser would refuse it ({len(problems)} problem(s)): {shown}")
