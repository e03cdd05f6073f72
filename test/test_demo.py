"""`nchunk demo` end to end on the built-in model: real node, camera and /ask over DDS on loopback."""
import os
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


def test_nchunk_demo_answers_questions_about_the_current_scene(tmp_path, monkeypatch):
    monkeypatch.setenv("NCHUNK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ROS_DOMAIN_ID", str(random.randint(20, 200)))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    LatencyTable.synthetic().save(cache_path(shipped_store(), 6))  # skip the one-time drive profile
    done = subprocess.run([sys.executable, "-m", "nchunk_ros.cli", "demo"], capture_output=True, text=True,
                          timeout=180, cwd=ROOT)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for expected in ("== 1. questions about", "truth: ", "chunking 0.5", "magnitude 0.5",
                     "sparsity 1.5 refused: ", "frames received", "demo finished"):
        assert expected in out, f"{expected!r} missing from:\n{out}"
    assert "first run on this drive" not in out  # the profile was found in the cache
    assert "Traceback" not in done.stderr and "terminate called" not in done.stderr
    answers = re.findall(r"  Q: .+? A: (.*?)\s+truth: (.*?)\s+([✓✗])", out)
    assert len(answers) >= 6, out
    assert all((a == t) == (mark == "✓") for a, t, mark in answers)
    right, total = map(int, re.search(r"(\d+) of (\d+) answers correct", out).groups())
    assert total == len(answers) and right >= 0.75 * total, out
