"""Builds and runs the standalone C++ test of the reader core (nchunk_core/csrc/tests/test_reader.cpp),
which runs its checks with the thread pool and with the io_uring backend."""
import os
import shutil
import subprocess

import pytest

from nchunk_core import _native

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nchunk_core", "csrc")
FLAGS = ["g++", "-std=c++17", "-O1", "-pthread", "-I", CSRC]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_reader_core_cpp(tmp_path):
    sources = [os.path.join(CSRC, "tests", "test_reader.cpp"),
               *(os.path.join(CSRC, name) for name in ("reader.cpp", "uring.cpp", "crc32c.cpp"))]
    objects = [str(tmp_path / (os.path.basename(s) + ".o")) for s in sources]
    compiles = [subprocess.Popen([*FLAGS, "-c", s, "-o", o], stderr=subprocess.PIPE, text=True)
                for s, o in zip(sources, objects)]  # compile the files in parallel
    for c in compiles:
        _, errors = c.communicate(timeout=120)
        assert c.returncode == 0, errors
    binary = str(tmp_path / "test_reader")
    subprocess.run([*FLAGS, *objects, "-o", binary], check=True, capture_output=True, timeout=60)
    run = subprocess.run([binary, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    # Every check ran with the io_uring backend too wherever this process can have a ring.
    assert ("io_uring: tested" in run.stdout) == (_native.io_uring_unavailable() == ""), run.stdout
