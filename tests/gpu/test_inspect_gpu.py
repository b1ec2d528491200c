"""``python -m retention_compile inspect`` on the quickstart at T=4096 on the GPU: the generated Triton (and
CUDA, where selected) kernels are written, named by site and shape with a header stating shape, plan and GPU,
each file compiles standalone, and Inductor's code (forward and backward) launches them."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
SEQ = 4096


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect")
    command = [sys.executable, "-m", "retention_compile", "inspect", str(ROOT / "examples" / "quickstart.py")]
    command += ["--out", str(out), "--", "--seq", str(SEQ), "--device", "cuda", "--steps", "1"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, json.loads((out / "report.json").read_text())


def _compiled_sites(data):
    last = max(s["graph"] for s in data["sites"])
    return [s for s in data["sites"] if s["graph"] == last]


def test_sites_are_planned_for_this_gpu(inspected):
    _, data = inspected
    sites = _compiled_sites(data)
    assert len(sites) == 2 and all(s["decision"] == "rewritten" for s in sites)
    for site in sites:
        assert site["plan"]["device"] != "CPU" and site["plan"]["T"] == SEQ
        assert site["plan"]["reason"].startswith(site["plan"]["device"])


def test_triton_kernels_are_written_with_their_header(inspected):
    out, data = inspected
    files = sorted((out / "kernels").glob("*.py"))
    assert files, "no Triton kernel was recorded (codegen must call retention_compile.inspection.record_kernel)"
    labels = {f"g{s['graph']}s{s['site']}" for s in _compiled_sites(data)}
    for path in files:
        assert any(path.name.startswith(label) for label in labels), path.name
        assert f"x{SEQ}x" in path.name
        header = path.read_text().split("\n\n", 1)[0]
        assert header.startswith("# retention_compile generated triton kernel")
        assert f", {SEQ}, " in header and "# plan:" in header and "# gpu:" in header and "not stated" not in header
    assert len(data["kernels"]) == len(files) + len(list((out / "kernels").glob("*.cu")))


def test_each_triton_file_imports_standalone(inspected):
    from triton.runtime.jit import JITFunction

    out, _ = inspected
    for path in sorted((out / "kernels").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"inspected_{path.stem.replace('-', '_')}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert any(isinstance(v, JITFunction) for v in vars(module).values()), f"{path.name} defines no @triton.jit"


def test_cuda_kernels_compile_standalone(inspected):
    from retention_compile.codegen import nvrtc

    out, _ = inspected
    files = sorted((out / "kernels").glob("*.cu"))
    if not files:
        pytest.skip("no CUDA kernel was selected for the quickstart")
    arch = nvrtc.gpu_arch(torch.cuda.current_device())
    for path in files:
        assert path.read_text().startswith("// retention_compile generated cuda kernel")
        assert nvrtc.compile_source(path.read_text(), arch)


def test_inductor_code_launches_the_kernels(inspected):
    from triton.runtime.jit import JITFunction

    out, _ = inspected
    code = {p.name: p.read_text() for p in (out / "inductor").glob("*.py")}
    assert any(name.endswith("_forward.py") for name in code) and any(name.endswith("_backward.py") for name in code)
    joined = "\n".join(code.values())
    for path in (out / "kernels").glob("*.py"):
        spec = importlib.util.spec_from_file_location(f"launched_{path.stem.replace('-', '_')}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        names = {v.fn.__name__ for v in vars(module).values() if isinstance(v, JITFunction)}
        assert any(name in joined for name in names), f"none of {sorted(names)} ({path.name}) is in Inductor's code"
