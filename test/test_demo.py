"""`nchunk demo` end to end on the built-in model: real node, camera and /ask over DDS on loopback."""
import random
import re
import subprocess
import sys
from pathlib import Path

from nchunk_core.demo.model import shipped_store
from nchunk_core.io.latency import LatencyTable
from nchunk_core.io.profile import cache_path
from nchunk_core.store import Store

ROOT = Path(__file__).resolve().parents[1]


def test_the_built_in_model_ships_as_a_valid_store():
    store = Store.open(shipped_store())
    assert store.verify(progress=False).ok
    size = sum(f.stat().st_size for f in shipped_store().iterdir())
    assert size <= 20 * 2**20
    for name in ("config.json", "tokenizer.json", "processor_config.json", "training.json"):
        assert (shipped_store() / name).is_file(), name


def demo_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NCHUNK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ROS_DOMAIN_ID", str(random.randint(20, 200)))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    LatencyTable.synthetic().save(cache_path(shipped_store(), 6))  # skip the one-time drive profile


def run_demo():
    return subprocess.run([sys.executable, "-m", "nchunk_ros.cli", "demo"], capture_output=True, text=True,
                          timeout=180, cwd=ROOT)


def test_nchunk_demo_answers_questions_about_the_current_scene(tmp_path, monkeypatch):
    demo_environment(tmp_path, monkeypatch)
    done = run_demo()
    out = done.stdout
    assert done.returncode in (0, 1), out + done.stderr
    for expected in ("== 1. questions about", "truth: ", "chunking 0.5", "magnitude 0.5",
                     "sparsity 1.5 refused: ", "frames received", "demo finished"):
        assert expected in out, f"{expected!r} missing from:\n{out}"
    assert "first run on this drive" not in out  # the profile was found in the cache
    assert "Traceback" not in done.stderr and "terminate called" not in done.stderr
    answers = re.findall(r"  Q: .+? A: (.*?)\s+truth: (.*?)\s+([✓✗?])  .*?ms(.*)", out)
    graded = [(a, t, mark) for a, t, mark, late in answers if mark != "?"]
    assert all(("from a frame of the" in late) == (mark == "?") for *_, mark, late in answers)
    assert len(graded) >= 6, out  # of 12: the camera moves on every 5 s, and 4 questions take well under that
    assert all((a == t) == (mark == "✓") for a, t, mark in graded)
    right, total = map(int, re.search(r"(\d+) of (\d+) answers correct", out).groups())
    assert total == len(graded) and right >= 0.75 * total, out
    assert done.returncode == (0 if right == total else 1), done.stderr  # a wrong answer fails the demo
    assert (f"{total - right} of {total} answers were wrong" in done.stderr) == (right < total)


def test_nchunk_demo_refuses_to_run_beside_another_camera(tmp_path, monkeypatch):
    demo_environment(tmp_path, monkeypatch)
    stray = subprocess.Popen([sys.executable, "-m", "nchunk_ros.tools.synthetic_camera"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # a camera left running in the same domain
    try:
        for line in stray.stderr:  # its start-up line: it publishes from here on
            if "publishing" in line:
                break
        assert stray.poll() is None, "the stray camera did not start"
        done = run_demo()
    finally:
        stray.terminate()
        stray.communicate(timeout=30)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "2 publishers on /camera/image_raw" in done.stderr and "pkill -f synthetic_camera" in done.stderr
    assert "== 1. questions" not in done.stdout  # nothing was asked about the stray camera's scenes
