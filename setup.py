"""pip entry point: one build, CMakeLists.txt, producing specops._C from csrc/.

Install against the torch you already have (so pip does not fetch another one):
    pip install --no-build-isolation .        # or -e . for development
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch
        from torch.utils import cpp_extension

        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        # Prefer the cmake installed beside this Python (pip's cmake) over the system one.
        cmake = shutil.which("cmake", path=os.path.dirname(sys.executable)) or "cmake"
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DTORCH_INCLUDE_DIRS=" + ";".join(cpp_extension.include_paths()),
            f"-DTORCH_LIBRARY_DIR={cpp_extension.library_paths()[0]}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DSPECOPS_TORCH_VERSION={torch.__version__}",
            f"-DSPECOPS_OUTPUT_DIR={output.parent}",
            f"-DSPECOPS_OUTPUT_NAME={output.name}",
            # -O1 for a quick build whose CPU kernels are not timed (CMakeLists.txt)
            "-DSPECOPS_OPT=" + os.environ.get("SPECOPS_OPT", "-O3"),
        ]
        subprocess.run(configure, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    name="specops",
    version="0.1.0",
    description="Speculative-decoding ops for PyTorch: lossless verification, sampling, KV rollback",
    packages=find_packages(include=["specops", "specops.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest", "hypothesis", "scipy", "numpy", "transformers", "triton"],
    },
    ext_modules=[CMakeExtension("specops._C")],
    cmdclass={"build_ext": CMakeBuild},
)
