"""Build and install the nchunk_ros ament_python package and the nchunk_core native extension.

The extension is plain C++17 with pybind11 and no machine-specific flags, so the same source builds on
x86-64 development machines and on aarch64 Jetson boards.
"""
import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

PACKAGE = "nchunk_ros"

native = Pybind11Extension(
    "nchunk_core._native",
    sorted(glob.glob("nchunk_core/csrc/*.cpp")),
    include_dirs=["nchunk_core/csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", "-fvisibility=hidden"],
    extra_link_args=["-pthread"],
    depends=sorted(glob.glob("nchunk_core/csrc/*.hpp")),
)


def share_files(folder):
    return [(os.path.join("share", PACKAGE, folder), sorted(glob.glob(os.path.join(folder, "*"))))]


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=["nchunk_ros", "nchunk_ros.*", "nchunk_core", "nchunk_core.*"]),
    # The built-in demo model (a converted store; `nchunk train-demo` rebuilds it).
    package_data={"nchunk_core.demo": ["data/shapes-vlm/*"]},
    ext_modules=[native],
    cmdclass={"build_ext": build_ext},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + PACKAGE]),
        ("share/" + PACKAGE, ["package.xml"]),
        *share_files("launch"),
        *share_files("config"),
    ],
    # torch is deliberately absent: a Jetson keeps the torch that comes with JetPack.
    install_requires=["setuptools", "numpy", "safetensors", "tqdm", "matplotlib", "pillow", "transformers>=5.24,<5.25",
                      "tokenizers"],
    zip_safe=False,
    maintainer="nchunk developers",
    maintainer_email="nchunk@example.org",
    description="Visual question answering on a robot with a VLM streamed from flash (Neuron Chunking).",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "nchunk = nchunk_ros.cli:main",
            "vqa_node = nchunk_ros.vqa_node:main",
            "synthetic_camera = nchunk_ros.tools.synthetic_camera:main",
        ],
    },
)
