"""The command lines of the ROS entry points (vqa_node, synthetic_camera): `--help`, and stray arguments.

rclpy reads its own arguments after `--ros-args` and ignores everything before it. Left alone,
`vqa_node --help` would start a node, and `vqa_node -p sparsity:=0.5` (without --ros-args) would
start one without the setting. `check_arguments` prints a help page built from the node's parameter
table for -h/--help, and refuses any other argument before `--ros-args` with the reason.
"""
from __future__ import annotations

import shutil
import sys
import textwrap

HELP_FLAGS = ("-h", "--help")


def _default_text(value) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_default_text(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _range_text(spec) -> str:
    if spec.low is None or isinstance(spec.default, bool):
        return ""
    if isinstance(spec.default, int):
        return f", {int(spec.low)} to {int(spec.high)}"
    return f", {spec.low:.10g} to {spec.high:.10g}"


def help_page(prog: str, usage: str, summary: str, parameters, epilog: str = "") -> str:
    """The `--help` text: `usage` lines, the `summary`, then every parameter (parameters.ParamSpec) with
    its default, range and description, and the `epilog`."""
    width = min(shutil.get_terminal_size((100, 24)).columns, 100)
    lines = ["usage: " + usage.replace("\n", "\n       "), ""]
    lines += textwrap.wrap(summary, width)
    lines += [""] + textwrap.wrap("ROS parameters (--ros-args -p NAME:=VALUE, or --params-file FILE; "
                                  f"`ros2 param describe /{prog} NAME` while it runs):", width)
    for spec in parameters:
        head = f"  {spec.name} (default {_default_text(spec.default)}{_range_text(spec)})"
        text = spec.description + ("; a change reloads the model" if spec.reload else "")
        lines.append(head)
        lines += textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    if epilog:
        lines += [""] + textwrap.wrap(epilog, width)
    return "\n".join(lines) + "\n"


def check_arguments(argv: list[str], prog: str, usage: str, summary: str, parameters, epilog: str = "") -> int | None:
    """None when `argv` (the program name first) may start the node; otherwise the exit status, after
    printing the help page (0, for -h/--help) or what is wrong (2, for an argument before --ros-args)."""
    own = argv[1:argv.index("--ros-args")] if "--ros-args" in argv else argv[1:]
    if any(a in HELP_FLAGS for a in own):
        sys.stdout.write(help_page(prog, usage, summary, parameters, epilog))
        return 0
    if own:
        print(f"{prog}: unrecognized argument {own[0]!r}: settings are ROS parameters, after --ros-args "
              f"(for example `{prog} --ros-args -p NAME:=VALUE`); `{prog} --help` lists them", file=sys.stderr)
        return 2
    return None
