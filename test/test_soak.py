"""`nchunk soak`, briefly: node and camera as separate processes, questions over /ask, SIGTERM exits."""
import json
import subprocess
import sys
from pathlib import Path

from nchunk_core.demo.model import shipped_store
from nchunk_core.io.latency import LatencyTable
from nchunk_core.io.profile import cache_path

ROOT = Path(__file__).resolve().parents[1]


def test_a_short_soak_answers_every_question_and_both_processes_exit_0(tmp_path, monkeypatch):
    monkeypatch.setenv("NCHUNK_CACHE_DIR", str(tmp_path / "cache"))
    # a cached profile for config/vqa.yaml's reader_threads 6: the node skips the one-time drive profile
    LatencyTable.synthetic().save(cache_path(shipped_store(), 6))
    done = subprocess.run([sys.executable, "-m", "nchunk_ros.cli", "soak", "--minutes", "0.25", "--ask-every", "3",
                           "--rate", "15", "--width", "320", "--height", "240", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["exit_codes"] == {"camera": 0, "node": 0}
    assert result["asked"] >= 4 and result["answered"] == result["asked"] and not result["failures"]
    assert int(result["intake"]["frames_appended"]) >= 1
    assert int(result["intake"]["frames_received"]) >= int(result["intake"]["frames_appended"])
    assert 0 < result["node_rss_start_mib"] <= result["node_rss_max_mib"]
    assert 0 < result["node_rss_after_warm_up_mib"] <= result["node_rss_max_mib"]
    assert 0 < result["answer_s_p50"] <= result["answer_s_max"] < 30
    logs = Path(result["logs"])
    assert (logs / "vqa_node.log").is_file() and (logs / "synthetic_camera.log").is_file()
    assert "Traceback" not in (logs / "vqa_node.log").read_text()
