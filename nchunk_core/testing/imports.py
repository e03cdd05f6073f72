"""What a Python command imports: `python -X importtime` in a child process, for tests of light commands."""
from __future__ import annotations

import subprocess
import sys


def imported_modules(args: list[str], cwd=None, env=None,
                     timeout: float = 120) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime *args` (in `cwd`, with `env`); return the finished process and every
    module it imported (dotted names, parents included)."""
    done = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)
    modules = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the header line
                modules.add(name)
    return done, modules
