"""Builds megatron_lite with its two C++ extensions.

    pip install torch==2.13.0          # or keep the torch you have (any >= 2.4)
    pip install --no-build-isolation -e .

--no-build-isolation lets the torch extension build against the installed torch instead of pip
downloading another one into a throw-away build environment. Without torch (or pybind11) at build
time the matching extension is skipped and the package uses its pure-Python fallbacks.
"""

import glob
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}

if os.environ.get("MEGATRON_LITE_NO_EXTENSIONS", "") not in ("1", "true", "yes"):
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("megatron_lite: pybind11 not installed; skipping the _helpers extension")
    else:
        ext_modules.append(
            Pybind11Extension(
                "megatron_lite._helpers",
                ["csrc/helpers.cpp"],
                cxx_std=17,
                extra_compile_args=["-O3"],
            )
        )

    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "megatron_lite: torch not importable at build time; skipping _fused_kernels "
            "(install torch first and use --no-build-isolation)"
        )
    else:
        sources = ["csrc/fused_kernels.cpp"]
        cxx = ["-O3", "-fopenmp"] if os.name != "nt" else ["/O2"]
        if torch.version.cuda and CUDA_HOME is not None:
            sources += sorted(glob.glob("csrc/*.cu"))
            ext = CUDAExtension(
                "megatron_lite._fused_kernels",
                sources,
                define_macros=[("WITH_CUDA", None)],
                extra_compile_args={
                    "cxx": cxx,
                    "nvcc": [
                        "-O3",
                        "--use_fast_math",
                        "-U__CUDA_NO_HALF_OPERATORS__",
                        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                    ],
                },
            )
        else:
            ext = CppExtension(
                "megatron_lite._fused_kernels",
                sources,
                extra_compile_args=cxx,
                extra_link_args=["-fopenmp"],
            )
        ext_modules.append(ext)
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    packages=find_packages(include=["megatron_lite", "megatron_lite.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
