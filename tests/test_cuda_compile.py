"""Every CUDA source in csrc/ compiles with nvcc for sm_80 and sm_90, and the CUDA glue of
fused_kernels.cpp compiles against the torch headers (nothing CUDA can link or run here: the GPU tests
in tests/gpu/ run the kernels where a GPU is present)."""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or (
    "/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc") else None
)
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not installed: CUDA compile check skipped"
)


def _cuda_include() -> str | None:
    real = os.path.realpath(NVCC) if NVCC else ""
    for cand in (
        os.environ.get("CUDA_HOME", ""),
        os.path.dirname(os.path.dirname(real)),
        *sorted(glob.glob("/usr/local/cuda*")),
    ):
        inc = os.path.join(cand, "include")
        if cand and os.path.exists(os.path.join(inc, "cuda_runtime_api.h")):
            return inc
    return None


def test_there_is_a_cuda_kernel_to_check():
    assert any(f.endswith("fused_softmax_cuda.cu") for f in CU_FILES)


@needs_nvcc
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("cu", CU_FILES, ids=os.path.basename)
def test_cu_file_compiles_with_nvcc(cu, arch, tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    cmd += ["-Xcompiler", "-Wall", "-c", cu, "-o", str(tmp_path / "k.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "k.o").stat().st_size > 0
    assert "warning" not in out.stderr.lower(), out.stderr


@pytest.mark.slow
@needs_nvcc
def test_cuda_glue_in_fused_kernels_cpp_compiles():
    from torch.utils.cpp_extension import include_paths

    cuda_inc = _cuda_include()
    assert cuda_inc is not None, "nvcc found but no CUDA include directory next to it"
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-w", "-DWITH_CUDA", "-DTORCH_EXTENSION_NAME=x"]
    cmd += ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", f"-I{sysconfig.get_paths()['include']}"]
    cmd += [f"-I{p}" for p in include_paths()] + [
        f"-I{cuda_inc}",
        "-I" + os.path.join(ROOT, "csrc"),
    ]
    cmd.append(os.path.join(ROOT, "csrc", "fused_kernels.cpp"))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert sys.platform.startswith("linux")
