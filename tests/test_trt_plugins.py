"""The TensorRT plugins of plugins/trt/ without TensorRT: their host logic (field parsing, I/O
tables, shape checks, output shapes, host bounds, attention split and workspace) is plain C++ in
plugins/trt/common/kvzapPluginHost.cpp; plugins/trt/tests/testPluginHost.cpp checks it, linked
with the CMake-built libkvzap_kernels.so for the split heuristic and workspace size it must agree
with. The CMake option stays off by default and refuses to run without TensorRT headers.

What needs TensorRT skips where it is absent (nothing here fakes it): compiling the plugin shells
and driving the built library through TensorRT's interface classes (testPluginInterfaces.cpp)
need its headers (TENSORRT_ROOT=<dir with include/NvInferRuntime.h>, as in NGC images), loading
the library into TensorRT's registry needs the `tensorrt` Python package too."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kvzap_trt.ops.cuda_kernels import PLUGINS
from tests.plugin_build import nvcc
from tests.test_kernels_build import cuda_includes

TRT = PLUGINS / "trt"
HOST_SOURCES = [TRT / "tests" / "testPluginHost.cpp", TRT / "common" / "kvzapPluginHost.cpp"]
SHELL_SOURCES = [TRT / "common" / "kvzapPluginUtils.cpp", TRT / "kvzapPlugins.cpp",
                 TRT / "kvzapVarlenPagedAttentionPlugin" / "kvzapVarlenPagedAttentionPlugin.cpp",
                 TRT / "kvzapEvictPlugin" / "kvzapEvictPlugin.cpp"]


def cxx() -> str:
    return shutil.which("g++") or pytest.skip("no C++ compiler")


@pytest.fixture(scope="module")
def host_test(cmake_build, tmp_path_factory) -> Path:
    """testPluginHost built without TensorRT against the session's libkvzap_kernels.so."""
    build, _ = cmake_build
    exe = tmp_path_factory.mktemp("trt_host") / "testPluginHost"
    made = subprocess.run(
        [cxx(), "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{PLUGINS / 'include'}", f"-I{TRT / 'common'}",
         *cuda_includes(nvcc()), *map(str, HOST_SOURCES), f"-L{build}", "-lkvzap_kernels", f"-Wl,-rpath,{build}",
         "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert made.returncode == 0, made.stderr[-4000:]
    return exe


@pytest.mark.parametrize("section", ["fields", "io", "shapes", "workspace"])
def test_plugin_host_logic_without_tensorrt(host_test, section):
    """fields: good and bad PluginField collections (name, type, length, duplicates, ranges, the
    required `window` >= 0) and the serialized fields parsing back; io: aliasing and dtype tables;
    shapes: output shapes and resolved dims for decode / prefill / W = 0 / empty batch / GQA 8,
    every input dimension off by one refused, ring_table's columns against ceil(window /
    block_size) (W = 0 with none); workspace: the split equals kvzapAttentionSplitSize and the bytes
    kvzapAttentionWorkspaceBytes, below the bound getWorkspaceSize returns, on any SM count."""
    run = subprocess.run([str(host_test), section], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:]
    assert f"{section}: " in run.stdout and ", 0 failed" in run.stdout


def test_default_build_has_no_tensorrt_plugins(cmake_build):
    build, log = cmake_build
    assert not list(build.rglob("libkvzap_trt_plugins.so"))
    assert "kvzap TensorRT plugins" not in log


def test_cmake_option_without_tensorrt_headers_stops_with_the_fix(tmp_path):
    if Path("/usr/include/x86_64-linux-gnu/NvInferRuntime.h").exists():
        pytest.skip("TensorRT headers installed system-wide: CMake finds them")
    configure = subprocess.run(
        ["cmake", "-S", str(PLUGINS), "-B", str(tmp_path), "-DKVZAP_TRT_PLUGINS=ON",
         f"-DTENSORRT_ROOT={tmp_path / 'nowhere'}", "-DTensorRT_INCLUDE_DIR=TensorRT_INCLUDE_DIR-NOTFOUND"],
        capture_output=True, text=True, env=dict(os.environ, CUDACXX=nvcc(), TENSORRT_ROOT=""),
    )
    assert configure.returncode != 0
    assert "NvInferRuntime.h was not found: pass -DTENSORRT_ROOT" in " ".join((configure.stdout + configure.stderr).split())


def tensorrt_include() -> Path:
    """TensorRT's include directory from TENSORRT_ROOT, or the system one of NGC images; skips
    where there is none."""
    candidates = [Path(os.environ["TENSORRT_ROOT"]) / "include"] if os.environ.get("TENSORRT_ROOT") else []
    candidates.append(Path("/usr/include/x86_64-linux-gnu"))
    for inc in candidates:
        if (inc / "NvInferRuntime.h").exists():
            return inc
    pytest.skip("TensorRT headers not found (set TENSORRT_ROOT)")


def test_plugin_shells_compile_against_tensorrt_headers(tmp_path):
    include = tensorrt_include()
    for source in SHELL_SOURCES:
        compiled = subprocess.run(
            [cxx(), "-std=c++17", "-Wall", "-Wextra", "-Werror", "-c", f"-I{PLUGINS / 'include'}", f"-I{TRT}",
             f"-I{TRT / 'common'}", "-isystem", str(include),
             *[flag.replace("-I", "-isystem", 1) for flag in cuda_includes(nvcc())],
             str(source), "-o", str(tmp_path / (source.stem + ".o"))],
            capture_output=True, text=True,
        )
        assert compiled.returncode == 0, compiled.stderr[-4000:]


@pytest.fixture(scope="module")
def plugin_library(tmp_path_factory) -> Path:
    include = tensorrt_include()
    build = tmp_path_factory.mktemp("trt_plugins")
    env = dict(os.environ, CUDACXX=nvcc())
    configure = subprocess.run(
        ["cmake", "-S", str(PLUGINS), "-B", str(build), "-DKVZAP_TRT_PLUGINS=ON", f"-DTensorRT_INCLUDE_DIR={include}"],
        capture_output=True, text=True, env=env,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    made = subprocess.run(["cmake", "--build", str(build), "-j", "2", "--target", "kvzap_trt_plugins"],
                          capture_output=True, text=True, env=env)
    assert made.returncode == 0, made.stdout[-4000:] + made.stderr[-4000:]
    assert "warning" not in (made.stdout + made.stderr).lower()
    return build / "trt" / "libkvzap_trt_plugins.so"


def test_plugin_library_exports_only_the_dynamic_plugin_entry_points(plugin_library):
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(plugin_library)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert {"getCreators", "setLoggerFinder"} <= set(symbols)
    assert not [s for s in symbols if s.startswith(("kvzap", "_Z"))]


def test_tensorrt_registry_loads_both_creators(plugin_library):
    trt = pytest.importorskip("tensorrt")
    import numpy as np

    registry = trt.get_plugin_registry()
    registry.load_library(str(plugin_library))
    int32, float32 = trt.PluginFieldType.INT32, trt.PluginFieldType.FLOAT32
    fields = {"KvzapVarlenPagedAttention": {"layer": int32, "window": int32, "scale": float32},
              "KvzapEvict": {"layer": int32, "window": int32, "threshold": float32}}
    for name, want in fields.items():
        creator = registry.get_creator(name, "1", "kvzap_trt")
        assert creator is not None, name
        assert {f.name: f.type for f in creator.field_names} == want
        values = {"layer": np.array([0], np.int32), "window": np.array([128], np.int32)}
        good = [trt.PluginField(k, values.get(k, np.array([0.125], np.float32)), t) for k, t in want.items()]
        assert creator.create_plugin(name, trt.PluginFieldCollection(good), trt.TensorRTPhase.BUILD) is not None
        no_window = trt.PluginFieldCollection([f for f in good if f.name != "window"])
        assert creator.create_plugin(name, no_window, trt.TensorRTPhase.BUILD) is None
        wrong_type = trt.PluginFieldCollection([
            trt.PluginField("layer", np.array([0.0], np.float32), trt.PluginFieldType.FLOAT32)])
        assert creator.create_plugin(name, wrong_type, trt.TensorRTPhase.BUILD) is None


def test_plugins_through_tensorrt_interfaces(plugin_library, tmp_path):
    """plugins/trt/tests/testPluginInterfaces.cpp: the library dlopen-ed and driven through
    TensorRT's own interface classes as the registry, parser and builder call it (creators,
    fields, onShapeChange again with unchanged shapes, clones keeping their resolved shapes,
    build-phase objects never launching, enqueue refusing outputs that are not their inputs'
    memory). Needs TensorRT's headers only; launches nothing."""
    exe = tmp_path / "testPluginInterfaces"
    made = subprocess.run(
        [cxx(), "-std=c++17", "-Wall", "-Wextra", "-Werror", "-isystem", str(tensorrt_include()),
         *[flag.replace("-I", "-isystem", 1) for flag in cuda_includes(nvcc())],
         str(TRT / "tests" / "testPluginInterfaces.cpp"), "-ldl", "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert made.returncode == 0, made.stderr[-4000:]
    run = subprocess.run([str(exe), str(plugin_library)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "0 failed" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
