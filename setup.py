"""Builds glm4.quant._C, the CPU kernels (glm4/quant/csrc), during `pip install`; metadata is in pyproject.toml.

The extension is optional: without a C++ compiler (or with a torch whose headers do not build it) the install
goes on and glm4 runs its pure-torch paths (glm4.quant.kernels.HAVE_EXT is False).
"""

import glob
import platform

from setuptools import setup

ext_modules, cmdclass = [], {}
if platform.machine().lower() in ("x86_64", "amd64"):
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # no torch in the build environment: install the pure-torch package
        pass
    else:
        ext_modules.append(CppExtension(
            "glm4.quant._C",
            ["glm4/quant/csrc/ops.cpp", "glm4/quant/csrc/gemv_avx2.cpp", "glm4/quant/csrc/gemv_avx512.cpp",
             "glm4/quant/csrc/gemv_bf16.cpp",
             "glm4/quant/csrc/fused_ops.cpp", "glm4/quant/csrc/fused_avx2.cpp",
             "glm4/quant/csrc/convert_avx2.cpp", "glm4/quant/csrc/convert_avx512.cpp",
             "glm4/quant/csrc/prefill_attn_avx2.cpp", "glm4/quant/csrc/prefill_attn_avx512.cpp",
             "glm4/quant/csrc/kquant_ops.cpp", "glm4/quant/csrc/kquant_avx2.cpp", "glm4/quant/csrc/kquant_avx512.cpp",
             "glm4/quant/csrc/kquant_gfni.cpp",
             "glm4/quant/csrc/gemm_ops.cpp", "glm4/quant/csrc/gemm_i8_avx2.cpp", "glm4/quant/csrc/gemm_f32_avx2.cpp",
             "glm4/quant/csrc/decode_stack.cpp", "glm4/quant/csrc/moe_route.cpp"],
            depends=sorted(glob.glob("glm4/quant/csrc/*.h")),  # a header edit rebuilds the sources (all of them)
            extra_compile_args=["-O3", "-fopenmp", "-Wno-unused-function"],  # no -march: kernels pick their ISA
            extra_link_args=["-fopenmp"],
            optional=True,
        ))
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=False)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
