"""The VQA node's parameters: the table, their descriptors and the check of a proposed change.

Everything here is plain data and pure functions (no Node needed): `check_parameters` is what the
node registers as its on-set-parameters callback, so start-up values and every later change go
through it; `selection_from` builds the one `SelectionSettings` value from the flat parameters (the
check builds it too, so a value it accepts always gives settings) and the node passes it to the
session unchanged. config/vqa.yaml documents every parameter.

A store may carry recommended settings (`Store.recommended`, nchunk_core/store/recommended.py) for
the parameters in RECOMMENDED_PARAMETERS: `recommended_values` gives the value in effect for each
of them that the user did not set (in a params file, with -p or with `ros2 param set`): the store's,
else the node's default. An empty store_path means the built-in store (`builtin_store`).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.exceptions import InvalidTopicNameException
from rclpy.validate_topic_name import validate_topic_name

from nchunk_core.runtime.select import ALLOCATIONS, CACHE_POLICIES, METHODS, SelectionSettings
from nchunk_core.runtime.setting_values import DECODING, FRAME_TOKENS_HELP, frame_tokens_value  # no torch
from nchunk_core.store.naming import DTYPES  # names only: a bad dtype is refused before torch loads

DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?)$")
QOS_RELIABILITIES = ("best_effort", "reliable")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    name: str
    default: object
    description: str
    low: float | None = None  # inclusive range, for numbers
    high: float | None = None
    reload: bool = False  # a change reloads the model (vqa_node.py's docstring)
    dynamic: bool = False  # takes a string or an integer (frame_tokens: a mode or a number of tokens)

    def descriptor(self) -> ParameterDescriptor:
        d = ParameterDescriptor(description=self.description, dynamic_typing=self.dynamic)
        if self.reload:
            d.additional_constraints = ("a change reloads the model before the next frame or question (setting "
                                        "the current value reloads too: a store replaced on disk is opened "
                                        "again); the context restarts from the newest frame; a failed load "
                                        "sets it back")
        if isinstance(self.default, bool) or self.low is None:
            return d
        if isinstance(self.default, int):
            d.integer_range = [IntegerRange(from_value=int(self.low), to_value=int(self.high), step=1)]
        else:
            d.floating_point_range = [FloatingPointRange(from_value=float(self.low),
                                                         to_value=float(self.high), step=0.0)]
        return d


PARAMETERS = (
    ParamSpec("store_path", "", "store directory written by `nchunk convert`; empty = the built-in demo "
              "model's store", reload=True),
    ParamSpec("device", "cpu", "compute device: cpu, cuda or cuda:N", reload=True),
    ParamSpec("dtype", "float32", "compute dtype: float32, float16 or bfloat16", reload=True),
    ParamSpec("reader_threads", 6, "threads reading weight rows from the drive (the drive profile is "
              "measured and cached for this count)", 1, 256, reload=True),
    ParamSpec("max_frames", 8, "frames kept in context; when full, the context is rebuilt from the last "
              "max_frames/2 frames and the new one (a change applies from the next frame)", 1, 1024),
    ParamSpec("ram_budget_mib", 0.0, "RAM in MiB for the hottest backbone rows, kept between frames and "
              "never read again (0 = none; a change re-reads the cache before the next frame)", 0.0, 1048576.0),
    ParamSpec("cache_policy", CACHE_POLICIES[0], "which rows the RAM budget keeps: static (the calibration's "
              "hottest rows) or frame (rows each frame read replace cached rows that mattered less lately); "
              "a change re-reads the cache before the next frame"),
    ParamSpec("image_topics", ["/camera/image_raw"], "camera topics; a name ending in /compressed is "
              "sensor_msgs/CompressedImage (JPEG/PNG), any other sensor_msgs/Image; the newest frame of "
              "any of them is appended"),
    ParamSpec("qos_reliability", "best_effort", "reliability of the camera subscriptions: best_effort "
              "(sensor data) or reliable (needed by a reliable-only publisher); history depth is 1"),
    ParamSpec("max_append_rate_hz", 2.0, "most frames appended per second; the newest frame wins, the "
              "others are skipped (0 = as fast as the model goes)", 0.0, 1000.0),
    ParamSpec("sparsity", 0.0, "fraction of the projections' weight rows NOT read from the drive, on average "
              "over the model by bytes "
              "(unset: the store's recommended value, else 0.0, the exact model)", 0.0, 0.99),
    ParamSpec("method", "chunking", "row selection: " + ", ".join(METHODS)),
    ParamSpec("allocation", "layerwise", "how sparsity is spread over the matrices: " + ", ".join(ALLOCATIONS)
              + " (layerwise: the store's calibrated allocation, uniform if it has none)"),
    ParamSpec("frame_budget_ms", 0.0, "> 0: each frame's sparsity is chosen so that its estimated time fits "
              "this many ms (sparsity then only applies to questions); 0 = off", 0.0, 600000.0),
    ParamSpec("chunk_start_kib", 0.0, "chunking: smallest candidate window in KiB (0 = default)", 0.0, 65536.0),
    ParamSpec("chunk_step_kib", 0.0, "chunking: window size step in KiB (0 = default)", 0.0, 65536.0),
    ParamSpec("chunk_max_kib", 0.0, "chunking: largest window in KiB (0 = the drive's saturation size)",
              0.0, 65536.0),
    ParamSpec("jump_cap_kib", 0.0, "chunking: largest stride of a sliding window in KiB (0 = default)",
              0.0, 65536.0),
    ParamSpec("max_new_tokens", 32, "answer length limit in tokens: the default of a request and the "
              "most a request may ask for; at most what the model's positions hold beside a frame and a "
              "question (a reload to a smaller model lowers it)", 1, 4096),
    ParamSpec("frame_tokens", "auto", "what one camera frame costs: " + FRAME_TOKENS_HELP + "; the modes of "
              "the loaded model are in its log; a change applies from the next frame, frames in context keep "
              "their tokens (LLaVA-OneVision between video and image modes: the next frame rebuilds the context)",
              dynamic=True),
    ParamSpec("decoding", "checkpoint", "checkpoint: greedy with generation_config.json's deterministic settings "
              "(stop ids, repetition penalty); greedy: plain greedy (stop ids still apply); a change applies "
              "from the next question"),
    ParamSpec("ask_timeout_s", 30.0, "deadline of a request that gives none, counted from its arrival and "
              "including the wait behind other requests", 0.1, 3600.0),
)
SPECS = {spec.name: spec for spec in PARAMETERS}
DEFAULTS = {spec.name: spec.default for spec in PARAMETERS}
RELOAD_PARAMETERS = tuple(spec.name for spec in PARAMETERS if spec.reload)
SELECTION_PARAMETERS = ("sparsity", "method", "allocation", "chunk_start_kib", "chunk_step_kib", "chunk_max_kib",
                        "jump_cap_kib")
SESSION_PARAMETERS = (*SELECTION_PARAMETERS, "max_frames", "ram_budget_mib", "cache_policy", "max_new_tokens",
                      "frame_budget_ms", "frame_tokens", "decoding")  # passed to Session.update
MODEL_PARAMETERS = ("frame_tokens", "decoding")  # the running model checks them (check_parameters' model_check)
SUBSCRIPTION_PARAMETERS = ("image_topics", "qos_reliability")
RECOMMENDED_PARAMETERS = ("sparsity", "method", "max_frames", "max_new_tokens")  # a store may recommend them


def builtin_store() -> Path:
    """The store of the built-in demo model, inside the installed nchunk_core package (what an
    empty store_path opens)."""
    from nchunk_core.demo.model import shipped_store

    return shipped_store()


def store_directory(store_path: str) -> Path:
    """The directory a store_path value names: empty = the built-in store."""
    return Path(store_path).expanduser() if store_path else builtin_store()


def recommended_values(recommended, user_set) -> dict:
    """{name: value} for every RECOMMENDED_PARAMETERS name not in `user_set`: the store's value from
    `recommended` (a store.Recommended, or None for a store without one), else the node's default.
    A number outside the parameter's range is taken to the nearest end of it."""
    values = {}
    for name in RECOMMENDED_PARAMETERS:
        if name in user_set:
            continue
        spec = SPECS[name]
        value = type(spec.default)(spec.default if recommended is None else getattr(recommended, name))
        if spec.low is not None:
            value = type(spec.default)(min(max(value, spec.low), spec.high))
        values[name] = value
    return values


def selection_from(values: dict) -> SelectionSettings:
    """The selection settings the parameters `values` ask for; ValueError when they are inconsistent.

    chunk_* all 0: windows None (per-matrix defaults); see SelectionSettings.from_kib.
    """
    return SelectionSettings.from_kib(values["sparsity"], values["method"], start_kib=values["chunk_start_kib"],
                                      step_kib=values["chunk_step_kib"], max_kib=values["chunk_max_kib"],
                                      jump_cap_kib=values["jump_cap_kib"], allocation=values["allocation"])


def _store_path_problem(value: str) -> str:
    if not value:
        return ""  # the built-in store
    path = Path(value).expanduser()
    if not path.is_dir():
        return f"store {path} does not exist (store_path)"
    if not (path / "manifest.json").is_file():
        return f"{path} is not an nchunk store: no manifest.json (store_path)"
    return ""


def _frame_tokens_problem(value) -> str:
    try:
        frame_tokens_value(value)
    except ValueError as exc:
        return str(exc)
    return ""


def _topics_problem(topics: list) -> str:
    if not topics:
        return "image_topics is empty: name at least one camera topic"
    if len(set(topics)) != len(topics):
        return f"image_topics names a topic twice: {topics}"
    for topic in topics:
        try:
            validate_topic_name(topic)
        except InvalidTopicNameException as exc:
            return f"image_topics: {topic!r} is not a valid topic name: {exc}"
    return ""


def check_parameters(changes: dict, current: dict, running: bool,
                     max_answer_tokens: int | None = None, model_check=None) -> SetParametersResult:
    """Whether parameter `changes` (name -> value) may be applied on top of `current`.

    Ranges and types are checked by rclpy from the descriptors; this checks everything else.
    `running`: the node has started, so a store_path must name a store directory (at start-up,
    opening the store says what is wrong, and the node exits). `max_answer_tokens`: the running
    model's limit for max_new_tokens (Session.max_answer_tokens), None before a model is open.
    `model_check(changes)`: why the running model refuses the MODEL_PARAMETERS in `changes` ("" if
    it takes them), None before a model is open; not asked when the same change reloads the model
    (the new model checks them as it opens, and a refusal is a failed reload).
    """
    problem = ""
    for name, value in changes.items():
        if name not in SPECS:
            continue  # e.g. use_sim_time: not ours
        if name == "store_path" and running:
            problem = _store_path_problem(value)
        elif name == "device" and not DEVICE_PATTERN.match(value):
            problem = f"device must be cpu, cuda or cuda:N, got {value!r}"
        elif name == "dtype" and value not in DTYPES:
            problem = f"dtype must be one of {', '.join(DTYPES)}, got {value!r}"
        elif name == "cache_policy" and value not in CACHE_POLICIES:
            problem = f"cache_policy must be one of {', '.join(CACHE_POLICIES)}, got {value!r}"
        elif name == "qos_reliability" and value not in QOS_RELIABILITIES:
            problem = f"qos_reliability must be best_effort or reliable, got {value!r}"
        elif name == "image_topics":
            problem = _topics_problem(list(value))
        elif name == "frame_tokens":
            problem = _frame_tokens_problem(value)
        elif name == "decoding" and value not in DECODING:
            problem = f"decoding must be one of {', '.join(DECODING)}, got {value!r}"
        elif name == "max_new_tokens" and max_answer_tokens is not None and value > max_answer_tokens:
            problem = (f"max_new_tokens {value} is above what the model holds: at most {max_answer_tokens} "
                       f"answer tokens fit beside the prompt, a frame and a question")
        if problem:
            return SetParametersResult(successful=False, reason=problem)
    model_changes = {k: v for k, v in changes.items() if k in MODEL_PARAMETERS}
    if model_check is not None and model_changes and not set(changes) & set(RELOAD_PARAMETERS):
        problem = model_check(model_changes)
        if problem:
            return SetParametersResult(successful=False, reason=problem)
    try:
        selection_from({**DEFAULTS, **current, **changes})  # sparsity, method and the windows
    except ValueError as exc:
        return SetParametersResult(successful=False, reason=str(exc))
    return SetParametersResult(successful=True)
