"""The `nchunk` command: nchunk_ros.cli adds the ROS subcommands to nchunk_core.cli's parser; parsing
and every `--help` load neither torch, transformers nor ROS, `nchunk profile` loads no torch, and
nchunk_core never imports nchunk_ros."""
import json
import os
import re
from pathlib import Path

from nchunk_core.io import profile as prof
from nchunk_core.io.latency import LatencyTable
from nchunk_core.testing.imports import imported_modules

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers"}
ROS = {"rclpy", "nchunk_interfaces", "nchunk_ros.ask_client"}
HELPS = [[], ["profile"], ["bench"], ["bench", "reader"], ["bench", "io"], ["bench", "session"],
         ["bench", "accuracy"], ["bench", "published"], ["convert"], ["train-demo"], ["verify"], ["upgrade"],
         ["ask"], ["demo"], ["soak"]]


def test_nchunk_ask_help_imports_no_torch():
    done, modules = imported_modules(["-m", "nchunk_ros.cli", "ask", "--help"], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: nchunk ask") and "--max-new-tokens" in done.stdout
    assert "nchunk_core.cli" in modules  # nchunk_ros.cli itself runs as __main__
    assert not (HEAVY | ROS) & modules, sorted((HEAVY | ROS) & modules)


def test_every_help_imports_no_torch():
    script = ("import contextlib, io, json, sys\nfrom nchunk_ros import cli\nout = []\n"
              f"for argv in {HELPS!r}:\n"
              "    text = io.StringIO()\n"
              "    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):\n"
              "        cli.main([*argv, '--help'])\n"
              "    out.append(text.getvalue())\n"
              "print(json.dumps(out))\n")
    done, modules = imported_modules(["-c", script], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    helps = json.loads(done.stdout)
    for argv, text in zip(HELPS, helps):
        assert text.startswith(f"usage: nchunk {' '.join(argv)}".rstrip()), (argv, text[:200])
    assert re.search(r"\{profile,bench,convert,train-demo,verify,ask,demo,soak\}|COMMAND", helps[0])
    for command in ("profile", "bench", "convert", "train-demo", "verify", "upgrade", "ask", "demo", "soak"):
        assert f"\n    {command}" in helps[0], command
    assert not (HEAVY | ROS) & modules, sorted((HEAVY | ROS) & modules)


def test_core_cli_has_no_ros_commands_and_imports_no_ros():
    done, modules = imported_modules(["-m", "nchunk_core.cli", "--help"], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\n    verify" in done.stdout and "\n    ask" not in done.stdout
    assert not any(m == "nchunk_ros" or m.startswith("nchunk_ros.") for m in modules)
    assert not HEAVY & modules


def test_nchunk_core_never_imports_nchunk_ros():
    pattern = re.compile(r"^\s*(import|from)\s+nchunk_ros\b", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "nchunk_core").rglob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []


def test_nchunk_profile_imports_no_torch(tmp_path, monkeypatch):
    """With the drive's table in the cache, `nchunk profile` reports it (and loads no torch)."""
    monkeypatch.setenv("NCHUNK_CACHE_DIR", str(tmp_path / "cache"))
    LatencyTable.synthetic(max_kib=64).save(prof.cache_path(tmp_path, 6))
    done, modules = imported_modules(["-m", "nchunk_ros.cli", "profile", "--dir", str(tmp_path), "--json"],
                                     cwd=ROOT, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["saturation_kib"] == 64 and out["cache"] == str(prof.cache_path(tmp_path, 6))
    assert "nchunk_core.io.profile" in modules and not HEAVY & modules, sorted(HEAVY & modules)
