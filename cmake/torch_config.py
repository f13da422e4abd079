"""Describe the installed torch for CMake: writes a .cmake file of set() commands.

Run by CMakeLists.txt with the Python interpreter that builds koopfast. find_package(Torch) is not
used: with a CUDA torch it demands a full CUDA toolkit even for a CPU-only build and resets
CMAKE_CUDA_ARCHITECTURES (see docs/build.md, item 4).
"""

import os
import sys


def cmake_list(items):
    return ";".join(str(i).replace("\\", "/") for i in items)


def main(out_path: str) -> None:
    try:
        import torch
        import torch.utils.cpp_extension as cpp_ext
    except ImportError as exc:  # reported by CMake with the commands to run
        sys.stderr.write(f"cannot import torch: {exc}\n")
        sys.exit(2)
    try:
        import pybind11

        pybind11_dir = pybind11.get_cmake_dir()
    except ImportError:
        pybind11_dir = ""

    torch_dir = os.path.dirname(torch.__file__)
    archs = []
    if torch.version.cuda is not None and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            archs.append(f"{major}.{minor}")
    values = {
        "KF_TORCH_VERSION": torch.__version__,
        "KF_TORCH_DIR": torch_dir,
        "KF_TORCH_INCLUDE_DIRS": cmake_list(cpp_ext.include_paths()),
        "KF_TORCH_LIBRARY_DIR": os.path.join(torch_dir, "lib"),
        "KF_TORCH_CXX11_ABI": int(torch._C._GLIBCXX_USE_CXX11_ABI),
        "KF_TORCH_CUDA_VERSION": torch.version.cuda or "",
        "KF_TORCH_VISIBLE_ARCHS": cmake_list(sorted(set(archs))),
        "KF_PYBIND11_DIR": pybind11_dir,
    }
    with open(out_path, "w") as f:
        for key, value in values.items():
            f.write(f'set({key} "{str(value).replace(chr(92), "/")}")\n')


if __name__ == "__main__":
    main(sys.argv[1])
