"""Install the nchunk_ros package where ROS 2 looks for it, in a prefix such as a virtual environment.

    python scripts/install_ros_package.py                  # into this Python's prefix (sys.prefix)
    python scripts/install_ros_package.py --prefix DIR --python PY

`pip install -e` skips setup.py's data_files, so after it ROS 2 cannot find the package:
`get_package_share_directory('nchunk_ros')` fails, and `ros2 launch nchunk_ros vqa.launch.py` and
`ros2 run nchunk_ros vqa_node` with it. This lays out in the prefix what colcon's
`--symlink-install` would, with links to the checkout so edits apply at once:

    share/ament_index/resource_index/packages/nchunk_ros   the ament index marker (an empty file)
    share/nchunk_ros/{package.xml,launch,config}           links to the checkout's files and folders
    lib/nchunk_ros/<script>                                each console script of setup.py: a small
                                                           script running its entry point with PY

and, when the prefix is a virtual environment, makes `source PREFIX/bin/activate` put the prefix on
AMENT_PREFIX_PATH (the list of prefixes ament_index_python searches; the ROS 2 PyPI wheels set only
LD_LIBRARY_PATH, so nothing else does) and `deactivate` restore it. The lines added to the activate
script sit between markers and are replaced, not repeated, by another run.

Idempotent: a file or link that is already right is left alone; the output says what changed.
"""
from __future__ import annotations

import argparse
import ast
import os
import shlex
import shutil
import sys
from pathlib import Path

PACKAGE = "nchunk_ros"
ROOT = Path(__file__).resolve().parent.parent
SHARED = ("package.xml", "launch", "config")  # what setup.py's data_files put in share/nchunk_ros
BEGIN = "# >>> nchunk: AMENT_PREFIX_PATH >>>"
END = "# <<< nchunk: AMENT_PREFIX_PATH <<<"


def console_scripts(setup_py: Path) -> dict[str, str]:
    """{name: "module:function"} of the console_scripts entry points in setup.py (read, not run)."""
    tree = ast.parse(setup_py.read_text(), str(setup_py))
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    specs = ast.literal_eval(value)
                    return {name.strip(): target.strip() for name, target in (s.split("=", 1) for s in specs)}
    raise SystemExit(f"{setup_py}: no console_scripts entry points found")


def launcher(python: str, name: str, target: str) -> str:
    module, function = target.split(":")
    return (f"#!{python}\n"
            f"# `ros2 run {PACKAGE} {name}`: the console script {name} = {target} of setup.py.\n"
            f"# Written by scripts/install_ros_package.py (run by scripts/setup.sh); edits are overwritten.\n"
            f"import sys\n\n"
            f"from {module} import {function}\n\n"
            f"if __name__ == \"__main__\":\n"
            f"    sys.exit({function}())\n")


class Installer:
    def __init__(self, prefix: Path, python: str, source: Path):
        self.prefix, self.python, self.source = prefix, python, source
        self.changed: list[str] = []

    def _note(self, path: Path) -> None:
        self.changed.append(str(path.relative_to(self.prefix)))

    def _clear(self, path: Path) -> None:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)

    def write(self, path: Path, text: str, mode: int = 0o644) -> None:
        if path.is_file() and not path.is_symlink() and path.read_text() == text \
                and (path.stat().st_mode & 0o777) == mode:
            return
        self._clear(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        os.replace(tmp, path)
        self._note(path)

    def link(self, path: Path, target: Path) -> None:
        if path.is_symlink() and os.readlink(path) == str(target):
            return
        self._clear(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
        self._note(path)

    def install(self) -> None:
        share = self.prefix / "share"
        marker = (self.source / "resource" / PACKAGE).read_text()
        self.write(share / "ament_index" / "resource_index" / "packages" / PACKAGE, marker)
        for name in SHARED:
            self.link(share / PACKAGE / name, self.source / name)
        scripts = console_scripts(self.source / "setup.py")
        for name, target in scripts.items():
            self.write(self.prefix / "lib" / PACKAGE / name, launcher(self.python, name, target), 0o755)
        activate = self.prefix / "bin" / "activate"
        if activate.is_file() and (self.prefix / "pyvenv.cfg").is_file():
            text = activate.read_text()
            patched = patch_activate(text, str(self.prefix))
            if patched != text:
                activate.write_text(patched)
                self._note(activate)


def _without_blocks(text: str) -> str:
    out, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.strip() == BEGIN:
            inside = True
        elif line.strip() == END:
            inside = False
        elif not inside:
            out.append(line)
    return "".join(out)


def patch_activate(text: str, prefix: str) -> str:
    """The venv's bash/zsh activate script with `prefix` put first on AMENT_PREFIX_PATH (unless it is
    on it already) and deactivate restoring the previous value, as it does for PATH."""
    text = _without_blocks(text)
    restore = f"""    {BEGIN}
    if [ -n "${{_NCHUNK_OLD_AMENT_PREFIX_PATH+set}}" ] ; then
        if [ -n "$_NCHUNK_OLD_AMENT_PREFIX_PATH" ] ; then
            AMENT_PREFIX_PATH="$_NCHUNK_OLD_AMENT_PREFIX_PATH"
            export AMENT_PREFIX_PATH
        else
            unset AMENT_PREFIX_PATH
        fi
        unset _NCHUNK_OLD_AMENT_PREFIX_PATH
    fi
    {END}
"""
    lines = text.splitlines(keepends=True)
    opening = [i for i, line in enumerate(lines) if line.replace(" ", "").startswith("deactivate(){")]
    if len(opening) != 1:
        raise SystemExit("the activate script has no single 'deactivate () {' line: not a venv activate script?")
    lines.insert(opening[0] + 1, restore)
    quoted = shlex.quote(prefix)
    extend = f"""{BEGIN}
# ROS 2 (ament_index_python: get_package_share_directory, ros2 launch, ros2 run) finds the packages
# installed in this environment through AMENT_PREFIX_PATH. Added by scripts/install_ros_package.py.
_NCHUNK_OLD_AMENT_PREFIX_PATH="${{AMENT_PREFIX_PATH:-}}"
_NCHUNK_PREFIX={quoted}
case ":${{AMENT_PREFIX_PATH:-}}:" in
    *":$_NCHUNK_PREFIX:"*) ;;
    *) AMENT_PREFIX_PATH="$_NCHUNK_PREFIX${{AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}}" ;;
esac
export AMENT_PREFIX_PATH
unset _NCHUNK_PREFIX
{END}
"""
    body = "".join(lines)
    return body + ("" if body.endswith("\n") else "\n") + extend


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default=sys.prefix, help="install prefix (default: this Python's, %(default)s)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter the lib/nchunk_ros scripts run with (default: %(default)s)")
    parser.add_argument("--source", default=str(ROOT), help="the nchunk_ros checkout (default: %(default)s)")
    args = parser.parse_args(argv)
    installer = Installer(Path(args.prefix).absolute(), args.python, Path(args.source).resolve())
    installer.install()
    where = installer.prefix
    print(f"nchunk_ros in {where}: " + (f"updated {', '.join(installer.changed)}" if installer.changed
                                        else "up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
