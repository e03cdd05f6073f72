#!/usr/bin/env bash
# Set up nchunk in a project-local virtual environment (.venv) and build the native extension.
#
#   bash scripts/setup.sh            # idempotent; a second run with nothing changed takes seconds
#
# What it does, in order:
#   1. A C++ compiler and Python headers: installed with apt-get when missing and running as root,
#      otherwise it stops and prints the apt-get line to run.
#   2. .venv: created with --system-site-packages when the system Python already has torch (Jetson:
#      JetPack's torch) so nothing is reinstalled or forced.
#   3. torch: only if the venv cannot import it. NCHUNK_TORCH_SPEC picks what to install; on x86-64
#      the default pins the CPU build torch==2.13.0 (an unpinned torch pulls GBs of CUDA packages).
#   4. ROS 2 Python packages: only if rclpy is not importable (a sourced ROS 2 install wins); on
#      CPython 3.11 they come from PyPI wheels (ros-rclpy and friends), elsewhere source ROS 2 first.
#   5. fio (optional, for 'nchunk bench reader') with apt-get when root; scripts/requirements.txt;
#      the package itself (editable) with the native extension, rebuilt only when its sources change.
#   6. The nchunk_interfaces package (the /ask service and action) built from the ROS 2 wheels into the venv.
#   7. The nchunk_ros package laid out where ROS 2 looks (scripts/install_ros_package.py): the ament
#      index marker, share/nchunk_ros (package.xml, launch/, config/ as links to this checkout) and
#      lib/nchunk_ros/<executable>; `source VENV/bin/activate` then puts the venv on AMENT_PREFIX_PATH,
#      so get_package_share_directory('nchunk_ros'), `ros2 launch` and `ros2 run` find the package.
# Environment: NCHUNK_VENV (default .venv), PYTHON (default python3.11, else python3), NCHUNK_TORCH_SPEC.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NCHUNK_VENV:-$ROOT/.venv}"
PY_BASE="${PYTHON:-$(command -v python3.11 || command -v python3)}"
STAMP_DIR="$VENV/.nchunk-stamps"
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
pip_q() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }

# 1. Toolchain --------------------------------------------------------------------------------------
need_pkgs=()
command -v c++ >/dev/null 2>&1 || need_pkgs+=(g++)
"$PY_BASE" -c 'import sysconfig, os, sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)' \
  || need_pkgs+=(python3-dev)
"$PY_BASE" -c 'import ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
if ((${#need_pkgs[@]})); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    say "installing ${need_pkgs[*]} with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "nchunk setup needs: ${need_pkgs[*]}. Run: sudo apt-get install -y ${need_pkgs[*]}" >&2
    exit 1
  fi
fi

# 2. Virtual environment ---------------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  venv_args=()
  if "$PY_BASE" -c 'import torch' >/dev/null 2>&1; then
    venv_args+=(--system-site-packages)
    say "system Python has torch: the venv will use it"
  fi
  say "creating $VENV"
  "$PY_BASE" -m venv "${venv_args[@]}" "$VENV"
fi
mkdir -p "$STAMP_DIR"
VPY="$VENV/bin/python"

# 3-5. Python packages, skipped when nothing changed since the last successful run -----------------
deps_hash=$(cat "$ROOT/scripts/requirements.txt" "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16)
if [[ "$(cat "$STAMP_DIR/deps" 2>/dev/null)" != "$deps_hash" ]]; then
  if ! "$VPY" -c 'import torch' >/dev/null 2>&1; then
    if [[ -z "${NCHUNK_TORCH_SPEC:-}" ]]; then
      case "$(uname -m)" in x86_64) NCHUNK_TORCH_SPEC="torch==2.13.0" ;; *) NCHUNK_TORCH_SPEC="torch" ;; esac
    fi
    say "installing $NCHUNK_TORCH_SPEC"
    pip_q "$NCHUNK_TORCH_SPEC"
  fi
  if ! "$VPY" -c 'import rclpy.action, sensor_msgs.msg, std_srvs.srv, diagnostic_msgs.msg, action_msgs.msg, unique_identifier_msgs.msg, ament_index_python' >/dev/null 2>&1; then
    if "$VPY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
      say "installing ROS 2 Python packages from PyPI wheels"
      # action_msgs and unique_identifier_msgs: actions (rclpy.action, the /ask action)
      pip_q ros-rclpy ros-sensor-msgs ros-std-msgs ros-std-srvs ros-diagnostic-msgs ros-rmw-fastrtps-cpp \
        ros-action-msgs ros-unique-identifier-msgs ros-ament-index-python
    else
      say "rclpy not found: source your ROS 2 install (e.g. /opt/ros/humble/setup.bash) to use the node"
    fi
  fi
  if ! command -v fio >/dev/null 2>&1 && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    say "installing fio (the reference for 'nchunk bench reader'; optional)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio; } >/dev/null 2>&1 \
      || say "fio could not be installed; 'nchunk bench reader' will say how"
  fi
  say "installing Python requirements"
  pip_q -r "$ROOT/scripts/requirements.txt"
  echo "$deps_hash" >"$STAMP_DIR/deps"
fi

src_hash=$(cd "$ROOT" && cat setup.py setup.cfg nchunk_core/csrc/*.cpp nchunk_core/csrc/*.hpp 2>/dev/null | sha256sum | cut -c1-16)
if [[ "$(cat "$STAMP_DIR/native" 2>/dev/null)" != "$src_hash" ]] || ! (cd "$ROOT" && "$VPY" -c 'import nchunk_core._native') 2>/dev/null; then
  say "building the native extension and installing nchunk (editable)"
  pip_q --no-deps --no-build-isolation -e "$ROOT"
  (cd "$ROOT" && "$VPY" -c 'import nchunk_core._native') || { echo "native extension failed to build" >&2; exit 1; }
  echo "$src_hash" >"$STAMP_DIR/native"
fi
# The /ask service (nchunk_interfaces) built against the ROS 2 wheels in the venv; with a sourced
# ROS 2 install it says to use colcon and does nothing. Seconds-fast when up to date.
if "$VPY" -c 'import rclpy' >/dev/null 2>&1; then
  bash "$ROOT/scripts/build_interfaces.sh" "$VENV"
fi
# 7. nchunk_ros where ROS 2 looks (pip's editable install skips setup.py's data_files). Idempotent.
ros_layout=$("$VPY" "$ROOT/scripts/install_ros_package.py" --prefix "$VENV")
say "$ros_layout"
say "ready: $VENV (activate with: source $VENV/bin/activate; then ROS 2 finds nchunk_ros)"
