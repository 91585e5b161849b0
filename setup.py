"""Build gptfast: the Python package, the Triton kernels (as gptfast.kernels) and
the sampling extension gptfast._C from csrc/.

Build switches (environment variables):
  GPTFAST_BUILD_EXT=0        skip the C++/CUDA extension (the reference is used)
  GPTFAST_BUILD_CUDA=0       build only the CPU part even where CUDA is available
  TORCH_CUDA_ARCH_LIST       CUDA archs; default "8.0;9.0" (sm_90 for H100/H200)
A failed extension build leaves a working install: gptfast falls back to the
pure-PyTorch sampler and `gptfast backends` says why.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default="1"):
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def extension_modules():
    if not _flag("GPTFAST_BUILD_EXT"):
        print("gptfast: GPTFAST_BUILD_EXT=0, skipping the gptfast._C extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # torch missing at build time: pure-Python install
        print(f"gptfast: torch not importable at build time ({exc}); skipping gptfast._C", file=sys.stderr)
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        return [], {}
    use_cuda = (
        _flag("GPTFAST_BUILD_CUDA")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(cu)
    )
    # no -std: torch.utils.cpp_extension adds the C++ standard this torch's headers need
    cxx = ["-O3"]
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP loop: without -fopenmp it runs on one thread
        cxx.append("-fopenmp")
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "gptfast._C",
            cpp + cu,
            extra_compile_args={"cxx": cxx + ["-DGPTFAST_WITH_CUDA"],
                                # no --use_fast_math: the Gumbel draw needs accurate logf
                                # near u = 1 to match the reference's tokens
                                "nvcc": ["-O3", "-lineinfo", "-DGPTFAST_WITH_CUDA"]},
        )
    else:
        ext = cpp_extension.CppExtension("gptfast._C", cpp, extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [])
    return [ext], {"build_ext": _optional_build_ext(cpp_extension.BuildExtension)}


def _optional_build_ext(base):
    class OptionalBuildExt(base):
        """A failed extension build warns instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                print(f"gptfast: WARNING: building gptfast._C failed ({exc}); "
                      "the pure-PyTorch sampler will be used", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                print(f"gptfast: WARNING: building {ext.name} failed ({exc}); "
                      "the pure-PyTorch sampler will be used", file=sys.stderr)

    return OptionalBuildExt.with_options(use_ninja=_flag("GPTFAST_USE_NINJA"))


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages(include=["gptfast", "gptfast.*"]) + ["gptfast.kernels", "gptfast.bench"],
    package_dir={"gptfast.kernels": "kernels", "gptfast.bench": "bench"},
    package_data={"gptfast": ["assets/*/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
