"""What `ros2 launch nchunk_ros vqa.launch.py` and `ros2 run nchunk_ros vqa_node` rely on, laid out by
scripts/install_ros_package.py (scripts/setup.sh runs it) in a fresh virtual environment: the ament
index marker, share/nchunk_ros with package.xml, launch/ and config/, executables in lib/nchunk_ros,
and an activate script that puts the environment on AMENT_PREFIX_PATH.

The environment is a real `python -m venv` (without pip: nothing is installed into it); its scripts
run this test's Python, which has nchunk and the ROS 2 wheels.
"""
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALLER = ROOT / "scripts" / "install_ros_package.py"
RUN_TIMEOUT_S = 120  # only reached when something is wrong


def install(prefix: Path) -> str:
    done = subprocess.run([sys.executable, str(INSTALLER), "--prefix", str(prefix), "--python", sys.executable],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("layout") / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(prefix)], check=True, timeout=RUN_TIMEOUT_S)
    first = install(prefix)
    assert "updated" in first and "share/nchunk_ros/launch" in first
    return prefix


def bash(script: str, env=None) -> str:
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def activated_env(venv: Path, ament_prefix_path: str | None = None) -> dict:
    """The environment `source VENV/bin/activate` gives, from the environment this test runs in."""
    env = dict(os.environ)
    env.pop("AMENT_PREFIX_PATH", None)
    if ament_prefix_path is not None:
        env["AMENT_PREFIX_PATH"] = ament_prefix_path
    out = bash(f"source {shlex.quote(str(venv / 'bin' / 'activate'))} && env -0", env)
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


def test_a_second_run_changes_nothing(venv):
    before = (venv / "bin" / "activate").read_text()
    assert "up to date" in install(venv)
    assert (venv / "bin" / "activate").read_text() == before
    assert before.count("nchunk: AMENT_PREFIX_PATH >>>") == 2  # once in deactivate, once at the end


def test_the_layout_matches_setup_py(venv):
    share = venv / "share" / "nchunk_ros"
    assert (venv / "share" / "ament_index" / "resource_index" / "packages" / "nchunk_ros").is_file()
    assert (share / "package.xml").read_text() == (ROOT / "package.xml").read_text()
    for folder in ("launch", "config"):  # setup.py: *share_files("launch"), *share_files("config")
        for source in (ROOT / folder).iterdir():
            assert (share / folder / source.name).read_bytes() == source.read_bytes()
    for name in ("vqa_node", "synthetic_camera", "nchunk"):
        script = venv / "lib" / "nchunk_ros" / name
        assert script.is_file() and os.access(script, os.X_OK)
        assert script.read_text().startswith(f"#!{sys.executable}\n")


def test_activation_sets_and_deactivation_restores_ament_prefix_path(venv):
    assert activated_env(venv)["AMENT_PREFIX_PATH"] == str(venv)
    ros = "/opt/ros/kilted"
    assert activated_env(venv, ros)["AMENT_PREFIX_PATH"] == f"{venv}:{ros}"
    activate = shlex.quote(str(venv / "bin" / "activate"))
    env = {k: v for k, v in os.environ.items() if k != "AMENT_PREFIX_PATH"}
    out = bash(f"export AMENT_PREFIX_PATH={ros}; source {activate}; source {activate}; echo \"$AMENT_PREFIX_PATH\"; "
               f"deactivate; echo \"$AMENT_PREFIX_PATH\"; source {activate}; deactivate; "
               f"unset AMENT_PREFIX_PATH; source {activate}; deactivate; echo \"${{AMENT_PREFIX_PATH-unset}}\"", env)
    assert out.splitlines() == [f"{venv}:{ros}", ros, "unset"]


def test_ros_finds_the_package_once_activated(venv):
    env = activated_env(venv)
    find = ("from ament_index_python.packages import get_package_share_directory, get_package_prefix\n"
            "print(get_package_share_directory('nchunk_ros')); print(get_package_prefix('nchunk_ros'))")
    done = subprocess.run([sys.executable, "-c", find], capture_output=True, text=True, env=env, cwd="/",
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    share, prefix = done.stdout.split()
    assert (share, prefix) == (str(venv / "share" / "nchunk_ros"), str(venv))
    # what vqa.launch.py opens, and what `ros2 run` looks for
    assert (Path(share) / "launch" / "vqa.launch.py").is_file()
    assert (Path(share) / "config" / "vqa.yaml").is_file()
    assert os.access(Path(prefix) / "lib" / "nchunk_ros" / "vqa_node", os.X_OK)
    # without activation, ament_index_python knows no prefix at all
    bare = {k: v for k, v in os.environ.items() if k != "AMENT_PREFIX_PATH"}
    done = subprocess.run([sys.executable, "-c", find], capture_output=True, text=True, env=bare, cwd="/",
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode != 0 and "AMENT_PREFIX_PATH" in done.stderr


def test_vqa_node_starts_from_lib_with_the_installed_params_file(venv, tmp_path, monkeypatch):
    """`ros2 run nchunk_ros vqa_node --ros-args --params-file <share>/config/vqa.yaml`: the executable
    runs the node's entry point, which reads the file and, its store_path being empty, serves the
    built-in model; SIGINT ends it with status 0."""
    from nchunk_core.demo.model import shipped_store
    from nchunk_core.io.latency import LatencyTable
    from nchunk_core.io.profile import cache_path

    monkeypatch.setenv("NCHUNK_CACHE_DIR", str(tmp_path))  # a synthetic drive profile: no profiling here
    LatencyTable.synthetic().save(cache_path(shipped_store(), 6))
    env = activated_env(venv)
    env["ROS_DOMAIN_ID"] = str(random.randint(110, 200))
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    params = venv / "share" / "nchunk_ros" / "config" / "vqa.yaml"
    proc = subprocess.Popen([str(venv / "lib" / "nchunk_ros" / "vqa_node"), "--ros-args", "--params-file", str(params)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd="/")
    lines = []
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not any("ready: /ask served" in line for line in lines):
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(lines)
            lines.append(line)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines) + out
    assert proc.returncode == 0, log
    assert f"the built-in demo model ({shipped_store()})" in log
    assert "Traceback" not in log
