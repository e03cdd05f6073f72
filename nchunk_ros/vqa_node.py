"""The VQA node: camera frames go into a frame-appending session, questions are answered over /ask.

    vqa_node --ros-args --params-file config/vqa.yaml -p store_path:=/nvme/store
    ros2 launch nchunk_ros vqa.launch.py params_file:=my.yaml          # the same, on a ROS 2 install

Interfaces (node name `vqa_node`):

- subscribes to every topic in `image_topics`: a name ending in `/compressed` carries
  sensor_msgs/CompressedImage (image_transport's naming), any other sensor_msgs/Image. Depth-1
  sensor-data QoS, reliability from `qos_reliability`.
  A frame's stamp is its header.stamp, or its arrival time when the publisher left the stamp zero.
- serves `/ask` (nchunk_interfaces/srv/Ask; every field is documented in Ask.srv).
- publishes each successful answer's text on `~/answer` (std_msgs/String) and statistics on
  `~/statistics` (diagnostic_msgs/DiagnosticArray, one DiagnosticStatus whose key/values carry the
  numbers): after every frame append (status name "vqa_node: frame": bytes read, I/O, selection,
  vision and compute seconds, rows read, retained importance, frames in context, sparsity, method)
  and once a second (status name "vqa_node: intake"). Both carry the intake counters:
  frames_received, frames_appended, frames_skipped (replaced by a newer frame before the model got
  to them: busy, rate limited or reloading), frames_malformed, append_failures, reloads,
  reload_failures and the /ask counters. A model reload publishes status "vqa_node: reload" (OK, or
  ERROR with the reason).

Threads: camera callbacks only convert the message (malformed ones are counted and logged,
throttled) and put the frame in a one-slot mailbox, replacing an older frame still waiting; one
worker thread owns the session and appends the newest waiting frame at most `max_append_rate_hz`
times a second. /ask callbacks run in their own reentrant callback group: each request joins a
bounded queue (MAX_WAITING_ASKS waiting, beyond that "busy") served in arrival order by the same
worker, ahead of waiting frames, and waits for its answer until its deadline (`timeout_s` of the
request, else `ask_timeout_s`). Frames keep arriving (and replacing each other) during an answer.
At the deadline, a request still waiting gets success=false, error "timed out" at once ("reloading
the model; timed out after N s" when a model reload held it up); decoding stops before its next
token and the response carries error "timed out after N s" and the answer so far. The question's
prefill is not interrupted: a request whose deadline passes during it gets that error at once with
an empty answer, and the prefill's result is dropped. A shutdown stops a decode the same way.

Parameters (config/vqa.yaml documents each): every one is checked by `check_parameters` when
declared and on every change, with a reason on refusal, and applies without a restart. The
selection settings (sparsity, method, chunk_*) and max_frames apply from the next frame or question
(a max_frames below the frames in context makes the next frame rebuild the context);
image_topics and qos_reliability re-subscribe at once; max_append_rate_hz, max_new_tokens and
ask_timeout_s apply at once. store_path, device, dtype and reader_threads reload the model: a
store_path that is not a directory with a manifest.json is refused at once; otherwise the worker,
before its next frame or question, opens a new session with the new values (the drive profile from
the cache, or a quick profile for a new drive or reader_threads) and only then closes the old one.
The frames in context are dropped: the context starts again from the newest camera frame.
Meanwhile questions wait in the queue and frames replace each other in the mailbox (counted as
skipped). When the new session cannot be opened, the old one keeps answering, the reason is logged
and published, and the parameters are set back to the running session's values. (Both sessions are
in RAM for a moment.)

Start-up opens the store, loads the drive profile of the store's drive from the cache or measures a
quick one (progress in the log), and builds the model. A missing or bad store, or a bad parameter
value, ends the process with exit code 1 and a one-line reason on stderr. SIGINT and SIGTERM stop it
cleanly with exit code 0, also during start-up (a Ctrl-C while the module's imports load included).
"""
from __future__ import annotations

import sys
from pathlib import Path

try:  # these take about half a second to load: a Ctrl-C meanwhile ends the vqa_node program quietly
    import collections
    import dataclasses
    import math
    import re
    import threading
    import time
    import traceback

    import rclpy
    from builtin_interfaces.msg import Time
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
    from rclpy.exceptions import InvalidTopicNameException, ParameterException
    from rclpy.exceptions import InvalidHandle
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from rclpy.validate_topic_name import validate_topic_name
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import String

    from nchunk_core.runtime.select import METHODS, ChunkParams
    from nchunk_core.store.naming import DTYPES  # names only: a bad dtype is refused before torch loads
    from nchunk_interfaces.srv import Ask

    from nchunk_ros.image_conversion import message_to_rgb
except KeyboardInterrupt:
    if __name__ != "__main__" and Path(sys.argv[0]).name != "vqa_node":
        raise  # imported by another program: the interrupt is that program's
    sys.exit(0)

NODE_NAME = "vqa_node"
SERVICE = "/ask"
MAX_WAITING_ASKS = 4  # requests waiting behind the one being answered; more are refused as busy
MAX_QUESTION_CHARS = 4000  # longer questions are refused before they reach the tokenizer
EXECUTOR_THREADS = MAX_WAITING_ASKS + 4  # waiting /ask callbacks + the running one + camera, timer, params
STATS_PERIOD_S = 1.0
MALFORMED_LOG_PERIOD_S = 5.0
QOS_RELIABILITY = {"best_effort": ReliabilityPolicy.BEST_EFFORT, "reliable": ReliabilityPolicy.RELIABLE}
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?)$")
SELECTION_PARAMETERS = ("sparsity", "method", "chunk_start_kib", "chunk_step_kib", "chunk_max_kib", "jump_cap_kib")
SESSION_PARAMETERS = (*SELECTION_PARAMETERS, "max_frames")  # passed to Session.update
SUBSCRIPTION_PARAMETERS = ("image_topics", "qos_reliability")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    name: str
    default: object
    description: str
    low: float | None = None  # inclusive range, for numbers
    high: float | None = None
    reload: bool = False  # a change reloads the model (module docstring)

    def descriptor(self) -> ParameterDescriptor:
        d = ParameterDescriptor(description=self.description)
        if self.reload:
            d.additional_constraints = ("a change reloads the model before the next frame or question; the "
                                        "context restarts from the newest frame; a failed load sets it back")
        if isinstance(self.default, bool) or self.low is None:
            return d
        if isinstance(self.default, int):
            d.integer_range = [IntegerRange(from_value=int(self.low), to_value=int(self.high), step=1)]
        else:
            d.floating_point_range = [FloatingPointRange(from_value=float(self.low),
                                                         to_value=float(self.high), step=0.0)]
        return d


PARAMETERS = (
    ParamSpec("store_path", "", "store directory written by `nchunk convert` (required)", reload=True),
    ParamSpec("device", "cpu", "compute device: cpu, cuda or cuda:N", reload=True),
    ParamSpec("dtype", "float32", "compute dtype: float32, float16 or bfloat16", reload=True),
    ParamSpec("reader_threads", 6, "threads reading weight rows from the drive (the drive profile is "
              "measured and cached for this count)", 1, 256, reload=True),
    ParamSpec("max_frames", 8, "frames kept in context; when full, the context is rebuilt from the last "
              "max_frames/2 frames and the new one (a change applies from the next frame)", 1, 1024),
    ParamSpec("image_topics", ["/camera/image_raw"], "camera topics; a name ending in /compressed is "
              "sensor_msgs/CompressedImage (JPEG/PNG), any other sensor_msgs/Image; the newest frame of "
              "any of them is appended"),
    ParamSpec("qos_reliability", "best_effort", "reliability of the camera subscriptions: best_effort "
              "(sensor data) or reliable (needed by a reliable-only publisher); history depth is 1"),
    ParamSpec("max_append_rate_hz", 2.0, "most frames appended per second; the newest frame wins, the "
              "others are skipped (0 = as fast as the model goes)", 0.0, 1000.0),
    ParamSpec("sparsity", 0.5, "fraction of the input rows of every projection NOT read from the drive",
              0.0, 0.99),
    ParamSpec("method", "chunking", "row selection: " + ", ".join(METHODS)),
    ParamSpec("chunk_start_kib", 0.0, "chunking: smallest candidate window in KiB (0 = default)", 0.0, 65536.0),
    ParamSpec("chunk_step_kib", 0.0, "chunking: window size step in KiB (0 = default)", 0.0, 65536.0),
    ParamSpec("chunk_max_kib", 0.0, "chunking: largest window in KiB (0 = the drive's saturation size)",
              0.0, 65536.0),
    ParamSpec("jump_cap_kib", 0.0, "chunking: largest stride of a sliding window in KiB (0 = default)",
              0.0, 65536.0),
    ParamSpec("max_new_tokens", 32, "answer length limit in tokens: the default of a request and the "
              "most a request may ask for", 1, 4096),
    ParamSpec("ask_timeout_s", 30.0, "deadline of a request that gives none, counted from its arrival and "
              "including the wait behind other requests", 0.1, 3600.0),
)
SPECS = {spec.name: spec for spec in PARAMETERS}
RELOAD_PARAMETERS = tuple(spec.name for spec in PARAMETERS if spec.reload)
DEFAULTS = {spec.name: spec.default for spec in PARAMETERS}


class StartupError(Exception):
    """The node cannot start; the message is the one-line reason printed on exit."""


def chunk_params_from(values: dict) -> ChunkParams | None:
    """The chunking windows the chunk_* parameters ask for; ValueError when inconsistent.

    All four 0: None, the per-matrix defaults of select.default_params. Otherwise explicit windows
    for every matrix, a 0 field taking ChunkParams' default (chunk_max_kib 0: saturation size).
    """
    fields = {"start_kib": values["chunk_start_kib"], "step_kib": values["chunk_step_kib"],
              "jump_cap_kib": values["jump_cap_kib"], "max_kib": values["chunk_max_kib"]}
    if all(v == 0 for v in fields.values()):
        return None
    explicit = {k: float(v) for k, v in fields.items() if v > 0}
    start = explicit.get("start_kib", ChunkParams.start_kib)
    if "max_kib" in explicit and explicit["max_kib"] < start:
        raise ValueError(f"chunk_max_kib ({explicit['max_kib']:g}) is below the smallest window "
                         f"({start:g} KiB): raise chunk_max_kib or set it to 0 (saturation size)")
    return ChunkParams(**explicit)


def check_parameters(changes: dict, current: dict, running: bool) -> SetParametersResult:
    """Whether parameter `changes` (name -> value) may be applied on top of `current`.

    Ranges and types are checked by rclpy from the descriptors; this checks everything else.
    `running`: the node has started, so a store_path must name a store directory (at start-up,
    opening the store says what is wrong, and the node exits).
    """
    def refuse(reason: str) -> SetParametersResult:
        return SetParametersResult(successful=False, reason=reason)

    for name, value in changes.items():
        spec = SPECS.get(name)
        if spec is None:
            continue  # e.g. use_sim_time: not ours
        if name == "store_path" and running:
            path = Path(value).expanduser()
            if not value:
                return refuse("store_path is empty: name a store directory written by `nchunk convert`")
            if not path.is_dir():
                return refuse(f"store {path} does not exist (store_path)")
            if not (path / "manifest.json").is_file():
                return refuse(f"{path} is not an nchunk store: no manifest.json (store_path)")
        if name == "device" and not DEVICE_PATTERN.match(value):
            return refuse(f"device must be cpu, cuda or cuda:N, got {value!r}")
        if name == "dtype" and value not in DTYPES:
            return refuse(f"dtype must be one of {', '.join(DTYPES)}, got {value!r}")
        if name == "method" and value not in METHODS:
            return refuse(f"method must be one of {', '.join(METHODS)}, got {value!r}")
        if name == "qos_reliability" and value not in QOS_RELIABILITY:
            return refuse(f"qos_reliability must be best_effort or reliable, got {value!r}")
        if name == "image_topics":
            topics = list(value)
            if not topics:
                return refuse("image_topics is empty: name at least one camera topic")
            if len(set(topics)) != len(topics):
                return refuse(f"image_topics names a topic twice: {topics}")
            for topic in topics:
                try:
                    validate_topic_name(topic)
                except InvalidTopicNameException as exc:
                    return refuse(f"image_topics: {topic!r} is not a valid topic name: {exc}")
    try:
        chunk_params_from({**DEFAULTS, **current, **changes})
    except ValueError as exc:
        return refuse(str(exc))
    return SetParametersResult(successful=True)


def topic_type(topic: str):
    """CompressedImage for a topic named like image_transport's compressed transport, else Image."""
    return CompressedImage if topic.rstrip("/").endswith("/compressed") else Image


def stamp_seconds(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def printable(text: str) -> str:
    """The answer without control characters other than newline and tab (NUL breaks C strings)."""
    return "".join(c for c in text if c in "\n\t" or not (ord(c) < 32 or 127 <= ord(c) < 160))


@dataclasses.dataclass
class Frame:
    rgb: object  # np.ndarray uint8 [H, W, 3]
    stamp: Time
    topic: str


@dataclasses.dataclass
class AskJob:
    request: Ask.Request
    arrival: float  # time.monotonic()
    deadline: float
    timeout: float  # deadline - arrival
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    response: Ask.Response | None = None
    started: float = 0.0  # time.monotonic() when the worker took it; 0 while waiting
    decoding: bool = False  # the worker is past the question's prefill (a deadline now gives a partial answer)
    abandoned: bool = False  # the caller stopped waiting (deadline)


class VQANode(Node):
    """Camera frames into a Session, /ask answered from the frames in context (module docstring)."""

    def __init__(self, **node_options):
        super().__init__(NODE_NAME, **node_options)
        self._session = None
        self._running = False  # the session is open: parameter changes apply to it
        self._values: dict = {}
        self._session_values: dict = {}  # the RELOAD_PARAMETERS values the session was opened with
        self._reload_wanted = False  # those differ from self._values: the worker reloads next
        self._reloading = False
        self._lock = threading.Condition()  # guards the mailbox, the ask queue and the counters
        self._pending: Frame | None = None
        self._asks: collections.deque[AskJob] = collections.deque()
        self._answering: AskJob | None = None  # the request the worker is on
        self._stop = False
        self._last_append = -math.inf
        self._counters = collections.Counter()
        self._camera_subscriptions = []
        self._context_tokens = 0  # tokens in the session's cache (frames and prompt prefix)
        self._newest: Frame | None = None  # the newest frame in the context
        self._frame_seen = False  # a well-formed frame has arrived

        self.add_on_set_parameters_callback(self._validate)  # before declaring: start-up values too
        self.add_post_set_parameters_callback(self._apply)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, spec.descriptor())

        self._session = self._open_session(self._values)
        self._session_values = {k: self._values[k] for k in RELOAD_PARAMETERS}
        self._running = True
        self._camera_group = MutuallyExclusiveCallbackGroup()
        self._ask_group = ReentrantCallbackGroup()
        self._answer_pub = self.create_publisher(String, "~/answer", 10)
        self._stats_pub = self.create_publisher(DiagnosticArray, "~/statistics", 10)
        self._subscribe()
        self._service = self.create_service(Ask, SERVICE, self._on_ask, callback_group=self._ask_group)
        self._timer = self.create_timer(STATS_PERIOD_S, self._publish_intake,
                                        callback_group=MutuallyExclusiveCallbackGroup())
        self._worker = threading.Thread(target=self._work, name="vqa-worker", daemon=True)
        self._worker.start()
        self.get_logger().info(f"ready: /ask served, listening on {', '.join(self._values['image_topics'])}")

    @property
    def session(self):
        """The Session the node answers from (owned by the node's worker thread: read-only use)."""
        return self._session

    # -- parameters ---------------------------------------------------------------------------------
    def _validate(self, params) -> SetParametersResult:
        changes = {p.name: p.value for p in params}
        return check_parameters(changes, dict(self._values), self._running)

    def _apply(self, params) -> None:
        try:
            self._apply_values(params)
        except Exception:  # validated already, so this is a bug: log it, keep the node up
            self.get_logger().error("applying a parameter change failed:\n" + traceback.format_exc())
            if not self._running:
                raise

    def _apply_values(self, params) -> None:
        changed = {p.name for p in params if self._values.get(p.name) != p.value}
        for p in params:
            self._values[p.name] = p.value
        if not self._running or not changed:
            return
        v = self._values
        if changed & set(SESSION_PARAMETERS):
            self._update_session(self._session)
        if changed & set(SELECTION_PARAMETERS):
            chunk = chunk_params_from(v)
            self.get_logger().info(f"selection from the next frame: {v['method']} at sparsity {v['sparsity']:g}"
                                   + ("" if chunk is None else f", windows {chunk}"))
        if "max_frames" in changed:
            self.get_logger().info(f"max_frames {v['max_frames']} from the next frame")
        if changed & set(SUBSCRIPTION_PARAMETERS):
            self._subscribe()
        if changed & set(RELOAD_PARAMETERS):
            with self._lock:  # a change back to the running session's values (a revert) cancels a reload
                self._reload_wanted = {k: v[k] for k in RELOAD_PARAMETERS} != self._session_values
                self._lock.notify_all()

    def _update_session(self, session) -> None:
        """Hand the selection settings and max_frames to `session` (applied at its next call)."""
        v = self._values
        chunk = chunk_params_from(v)
        session.update(sparsity=v["sparsity"], method=v["method"], chunk_params="default" if chunk is None else chunk,
                       max_frames=v["max_frames"])

    # -- opening the store (start-up and reloads) ----------------------------------------------------
    def _open_session(self, v: dict):
        """A Session opened with the parameter values `v`; StartupError with the one-line reason."""
        log = self.get_logger()
        if not v["store_path"]:
            raise StartupError("store_path is not set: pass -p store_path:=/path/to/store or a params file")
        path = Path(v["store_path"]).expanduser()
        if not path.is_dir():
            raise StartupError(f"store {path} does not exist (store_path)")

        from nchunk_core.io.profile import load_or_profile  # torch comes with these: imported when needed
        from nchunk_core.runtime.session import Session, SessionConfig
        from nchunk_core.store import Store, StoreError

        try:
            cfg = SessionConfig(device=v["device"], dtype=v["dtype"], sparsity=v["sparsity"], method=v["method"],
                                chunk_params=chunk_params_from(v), threads=v["reader_threads"],
                                max_frames=v["max_frames"], max_new_tokens=v["max_new_tokens"], profile_quick=True)
        except ValueError as exc:
            raise StartupError(f"invalid configuration: {exc}") from exc
        try:
            Store.open(path)  # fail fast, before profiling the drive
        except (StoreError, OSError) as exc:
            raise StartupError(f"cannot open store {path}: {exc}") from exc
        shown = [-1]

        def progress(fraction: float, message: str) -> None:
            if not self.context.ok() or self._stop:  # a signal or shutdown while profiling: the scratch file goes too
                raise ExternalShutdownException()
            decile = int(fraction * 10)
            if decile > shown[0]:
                shown[0] = decile
                log.info(f"drive profile {fraction:4.0%}: {message}")

        try:
            table = load_or_profile(path, threads=v["reader_threads"], quick=True, progress=progress, log=log.info)
        except OSError as exc:
            raise StartupError(f"cannot profile the drive holding {path}: {exc}") from exc
        log.info(f"drive: saturation {table.saturation_bytes // 1024} KiB, peak "
                 f"{table.peak_bytes_per_s / 1e6:.0f} MB/s")
        try:
            session = Session.open(path, cfg, log=log.info, table=table)
        except (StoreError, OSError, ValueError, RuntimeError) as exc:
            raise StartupError(f"cannot load the model from {path}: {exc}") from exc
        if not self.context.ok() or self._stop:  # a signal arrived while the model was being built
            session.close()
            raise ExternalShutdownException()
        log.info(f"model ready on {v['device']} ({v['dtype']}): {v['method']} at sparsity {v['sparsity']:g}")
        return session

    # -- camera -------------------------------------------------------------------------------------
    def _subscribe(self) -> None:
        for sub in self._camera_subscriptions:
            self.destroy_subscription(sub)
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, durability=DurabilityPolicy.VOLATILE,
                         reliability=QOS_RELIABILITY[self._values["qos_reliability"]])
        self._camera_subscriptions = [
            self.create_subscription(topic_type(topic), topic, lambda msg, t=topic: self._on_image(msg, t),
                                     qos, callback_group=self._camera_group)
            for topic in self._values["image_topics"]]
        self.get_logger().info("camera: " + ", ".join(
            f"{t} ({topic_type(t).__name__}, {self._values['qos_reliability']})" for t in self._values["image_topics"]))

    def _on_image(self, msg, topic: str) -> None:
        with self._lock:
            self._counters["frames_received"] += 1
        try:
            rgb = message_to_rgb(msg)
        except Exception as exc:  # ValueError for every malformed message; nothing may stop the intake
            with self._lock:
                self._counters["frames_malformed"] += 1
                count = self._counters["frames_malformed"]
            self.get_logger().warning(f"malformed image on {topic} ignored ({count} so far): {exc}",
                                      throttle_duration_sec=MALFORMED_LOG_PERIOD_S)
            return
        stamp = msg.header.stamp
        if stamp.sec == 0 and stamp.nanosec == 0:  # publisher left it unset: use the arrival time
            stamp = self.get_clock().now().to_msg()
        with self._lock:
            if self._pending is not None:
                self._counters["frames_skipped"] += 1
            self._pending = Frame(rgb, stamp, topic)
            self._frame_seen = True
            self._lock.notify_all()

    # -- /ask ---------------------------------------------------------------------------------------
    def _on_ask(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        arrival = time.monotonic()
        try:
            return self._serve(request, response, arrival)
        except Exception as exc:  # a bug here must not take the node down with it
            self.get_logger().error("/ask failed:\n" + traceback.format_exc())
            return self._failed(Ask.Response(), f"internal error: {type(exc).__name__}: {exc}", arrival,
                                "asks_failed")

    def _serve(self, request: Ask.Request, response: Ask.Response, arrival: float) -> Ask.Response:
        error = self._check_request(request)
        if error:
            return self._failed(response, error, arrival, "asks_refused")
        timeout = request.timeout_s if request.timeout_s > 0 else self._values["ask_timeout_s"]
        job = AskJob(request, arrival, arrival + timeout, timeout)
        with self._lock:
            waiting = len(self._asks)  # queued jobs have not started yet
            if waiting >= MAX_WAITING_ASKS:
                return self._failed(response, f"busy: {waiting} questions are already waiting; try again later",
                                    arrival, "asks_busy", lock_held=True)
            self._asks.append(job)
            self._lock.notify_all()
        if job.done.wait(max(0.0, job.deadline - time.monotonic())):
            return job.response
        with self._lock:
            if job.done.is_set():  # finished right at the deadline
                return job.response
            decoding = job.decoding
            if not decoding:
                job.abandoned = True
                if not job.started:
                    self._asks.remove(job)
            frames, reloading = self._session.frames_in_context, self._reloading
        if decoding:  # decoding stops before its next token: the partial answer comes in a moment
            job.done.wait()
            return job.response
        if job.started:  # the deadline passed during the question's prefill: no answer token yet
            error = f"timed out after {timeout:g} s"
        else:
            error = f"reloading the model; timed out after {timeout:g} s" if reloading else "timed out"
        response.frames_in_context = frames
        response.queue_s = (job.started or time.monotonic()) - arrival
        return self._failed(response, error, arrival, "asks_timed_out")

    def _check_request(self, request: Ask.Request) -> str:
        question = request.question
        if not question.strip():
            return "empty question"
        if len(question) > MAX_QUESTION_CHARS:
            return f"question is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}"
        if request.max_new_tokens < 0:
            return f"max_new_tokens must be >= 0 (0 = the node's default), got {request.max_new_tokens}"
        if not math.isfinite(request.timeout_s) or request.timeout_s < 0:
            return f"timeout_s must be >= 0 (0 = the node's ask_timeout_s), got {request.timeout_s}"
        if not self._frame_seen:  # otherwise the worker appends a waiting frame before answering
            return f"no camera frame yet (listening on {', '.join(self._values['image_topics'])})"
        return ""

    def _failed(self, response: Ask.Response, error: str, arrival: float, counter: str,
                lock_held: bool = False) -> Ask.Response:
        response.success = False
        response.error = error
        response.total_s = time.monotonic() - arrival
        if lock_held:
            self._counters[counter] += 1
        else:
            with self._lock:
                self._counters[counter] += 1
        return response

    # -- the worker: the only thread that touches the session ---------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                task, item = self._next_task()
            if task is None:
                return  # stopping
            try:
                if task == "reload":
                    self._reload(item)
                elif task == "ask":
                    self._answer(item)
                else:
                    self._append(item)
            except Exception:  # never let the worker die: log, count and go on
                self.get_logger().error("worker failure:\n" + traceback.format_exc())

    def _next_task(self) -> tuple[str | None, object]:
        """Under the lock: ("reload", parameter values) first, then ("ask", AskJob), then ("frame",
        Frame); (None, None) to stop."""
        while not self._stop:
            if self._reload_wanted:
                self._reload_wanted, self._reloading = False, True
                return "reload", dict(self._values)
            if self._asks and (self._session.frames_in_context > 0 or self._pending is None):
                job = self._asks.popleft()
                job.started = time.monotonic()
                return "ask", job
            if self._pending is not None:
                rate = self._values["max_append_rate_hz"]
                wait = self._last_append + (1.0 / rate if rate > 0 else 0.0) - time.monotonic()
                if wait <= 0 or (self._asks and self._session.frames_in_context == 0):
                    frame, self._pending = self._pending, None
                    self._last_append = time.monotonic()
                    return "frame", frame
                self._lock.wait(wait)
            else:
                self._lock.wait()
        return None, None

    def _reload(self, values: dict) -> None:
        """Open a session with `values`; swap it in if that works, else keep the old one and revert."""
        log, old = self.get_logger(), self._session
        changes = ", ".join(f"{k} {self._session_values[k]!r} -> {values[k]!r}" for k in RELOAD_PARAMETERS
                            if values[k] != self._session_values[k])
        try:
            if not changes:  # set back before the worker got to it
                return
            log.info(f"reloading the model ({changes}): questions wait, frames are skipped meanwhile")
            try:
                session = self._open_session(values)
            except ExternalShutdownException:
                return  # stopping
            except Exception as exc:  # StartupError: the one-line reason; anything else: a runtime failure
                reason = str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self._counters["reload_failures"] += 1
                log.error(f"model reload failed, still answering with the running model: {reason}")
                self._publish_status("vqa_node: reload", DiagnosticStatus.ERROR, f"reload failed: {reason}",
                                     {"changes": changes})
                self._revert(values)
                return
            with self._lock:
                self._session = session
                self._session_values = {k: values[k] for k in RELOAD_PARAMETERS}
                self._context_tokens = 0
                if self._pending is None:  # the context restarts from the newest frame
                    self._pending = self._newest
                self._newest = None
                self._counters["reloads"] += 1
        finally:
            with self._lock:
                self._reloading = False
        self._update_session(session)  # selection or max_frames changed while it was opening
        old.close()
        message = f"model reloaded ({changes}): earlier frames are gone, the context starts again from the newest frame"
        log.info(message)
        self._publish_status("vqa_node: reload", DiagnosticStatus.OK, message, {"changes": changes})

    def _revert(self, failed: dict) -> None:
        """Set the parameters that asked for the `failed` reload back to the running session's values."""
        back = [Parameter(k, value=self._session_values[k]) for k in RELOAD_PARAMETERS
                if self._values[k] == failed[k] != self._session_values[k]]
        if not back:  # changed again meanwhile: the next reload tries that
            return
        result = self.set_parameters_atomically(back)  # _apply_values then finds nothing to reload
        names = ", ".join(f"{p.name} {p.value!r}" for p in back)
        if result.successful:
            self.get_logger().info(f"parameters set back to the running model's: {names}")
        else:
            self.get_logger().error(f"cannot set the parameters back to the running model's ({names}): {result.reason}")

    def _append(self, frame: Frame):
        v = dict(self._values)  # the selection settings this append starts with
        try:
            stats = self._session.append_frame(frame.rgb, stamp=stamp_seconds(frame.stamp))
        except Exception as exc:  # ValueError: a frame the model cannot take; others: I/O or runtime failures
            with self._lock:
                self._counters["append_failures"] += 1
            detail = "" if isinstance(exc, ValueError) else "\n" + traceback.format_exc()
            self.get_logger().error(f"frame from {frame.topic} not appended: {exc}{detail}",
                                    throttle_duration_sec=MALFORMED_LOG_PERIOD_S)
            self._publish_status("vqa_node: frame", DiagnosticStatus.ERROR, f"append failed: {exc}", {})
            return None
        self._context_tokens = stats.tokens if stats.rebuilt else self._context_tokens + stats.tokens
        self._newest = frame
        with self._lock:
            self._counters["frames_appended"] += 1
        values = {
            "topic": frame.topic, "stamp": f"{stamp_seconds(frame.stamp):.6f}",
            "bytes_read": stats.bytes_read, "reads": stats.reads, "io_s": f"{stats.io_s:.6f}",
            "est_io_s": f"{stats.est_io_s:.6f}",
            "select_s": f"{stats.select_s:.6f}", "vision_s": f"{stats.vision_s:.6f}",
            "compute_s": f"{stats.compute_s:.6f}", "total_s": f"{stats.total_s:.6f}",
            "rows_read": stats.rows_read, "rows_total": stats.rows_total, "retained": f"{stats.retained:.4f}",
            "visual_tokens": stats.visual_tokens, "tokens": stats.tokens, "context_tokens": self._context_tokens,
            "frames_in_context": stats.frames_in_context, "rebuilt": stats.rebuilt,
            "sparsity": f"{v['sparsity']:g}", "method": v["method"], "max_frames": v["max_frames"],
            **{k: self._session_values[k] for k in ("device", "dtype", "reader_threads")},
        }
        mib_s = stats.bytes_read / stats.io_s / 2**20 if stats.io_s > 0 else 0.0
        self._publish_status("vqa_node: frame", DiagnosticStatus.OK,
                             f"frame appended: {stats.bytes_read / 2**20:.2f} MiB in {stats.reads} reads, "
                             f"{stats.io_s * 1e3:.1f} ms ({mib_s:.0f} MiB/s), {stats.frames_in_context} frames "
                             f"in context", values)
        return stats

    def _answer(self, job: AskJob) -> None:
        self._answering = job
        try:
            self._answer_job(job)
        except Exception as exc:  # a bug: the caller must still get a response
            self.get_logger().error("answering failed:\n" + traceback.format_exc())
            if not job.done.is_set():
                self._finish(job, Ask.Response(), f"internal error: {type(exc).__name__}: {exc}", "asks_failed")
        finally:
            self._answering = None

    def _answer_job(self, job: AskJob) -> None:
        request, session = job.request, self._session
        response = Ask.Response()
        response.queue_s = job.started - job.arrival
        limit = self._values["max_new_tokens"]
        n_new = min(request.max_new_tokens, limit) if request.max_new_tokens > 0 else limit
        extra_prefill = 0.0
        try:
            if request.reset_context and self._newest is not None and session.frames_in_context > 1:
                t0 = time.monotonic()
                session.reset()
                self._context_tokens = 0
                if self._append(self._newest) is None:
                    raise RuntimeError("the newest frame could not be appended again after the reset")
                extra_prefill = time.monotonic() - t0
            if session.frames_in_context == 0:
                raise ValueError(f"no camera frame yet (listening on {', '.join(self._values['image_topics'])})")

            def should_stop() -> bool:  # asked before each answer token, so the prefill is over
                with self._lock:
                    job.decoding = True
                    return job.abandoned or self._stop

            answer = session.ask(request.question, max_new_tokens=n_new, deadline=job.deadline,
                                 should_stop=should_stop)
        except ValueError as exc:
            self._finish(job, response, str(exc), "asks_failed")
            return
        except Exception as exc:  # a runtime failure (I/O, model): answer with it and keep serving
            self.get_logger().error(f"question failed:\n{traceback.format_exc()}")
            self._finish(job, response, f"runtime failure: {type(exc).__name__}: {exc}", "asks_failed")
            return
        stop_ids = set(session.stop_ids)
        generated = [t for t in answer.token_ids if t not in stop_ids]
        question_tokens = session.adapter.encode_text(session.adapter.question_prompt(request.question.strip()))
        response.success = True
        response.answer = printable(answer.text)
        response.truncated = answer.interrupted or (len(answer.token_ids) >= n_new
                                                    and answer.token_ids[-1] not in stop_ids)
        response.frames_in_context = answer.frames_in_context
        if answer.frames_in_context and self._newest is not None:
            response.newest_frame_stamp = self._newest.stamp
        response.context_tokens = self._context_tokens + question_tokens.num_tokens
        response.tokens_generated = len(generated)
        response.prefill_s = extra_prefill + answer.prefill_s
        response.decode_s = answer.decode_s
        response.io_bytes = int(answer.bytes_read)
        response.io_reads = int(answer.reads)
        response.io_s = float(answer.io_s)
        error = ""
        if answer.interrupted:  # the partial answer stays in the response
            error = "node shutting down" if self._stop else f"timed out after {job.timeout:g} s"
        self._finish(job, response, error, "asks_timed_out" if error else "asks_answered")

    def _finish(self, job: AskJob, response: Ask.Response, error: str, counter: str) -> None:
        response.error = error
        if error:
            response.success = False
            response.frames_in_context = self._session.frames_in_context
        response.total_s = time.monotonic() - job.arrival
        with self._lock:
            abandoned = job.abandoned
            if not abandoned:
                self._counters[counter] += 1
                job.response = response
                job.done.set()
        if abandoned:
            self.get_logger().warning(f"a question's deadline passed during its prefill: the caller got "
                                      f"'timed out'; its result ({response.total_s:.2f} s after arrival) is dropped")
        elif response.success and self.context.ok():
            try:
                self._answer_pub.publish(String(data=response.answer))
            except Exception:  # the context went down between the check and the publish
                pass

    # -- statistics ---------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """A snapshot of the intake, reload and /ask counters, with asks_waiting, asks_in_progress and
        reloading (0 or 1)."""
        with self._lock:
            return {**self._counters, "asks_waiting": len(self._asks),
                    "asks_in_progress": int(self._answering is not None), "reloading": int(self._reloading)}

    def _publish_status(self, name: str, level: bytes, message: str, values: dict) -> None:
        counters = self.counters()
        keys = ("frames_received", "frames_appended", "frames_skipped", "frames_malformed", "append_failures",
                "reloads", "reload_failures", "reloading", "asks_answered", "asks_failed", "asks_refused",
                "asks_busy", "asks_timed_out", "asks_waiting", "asks_in_progress")
        values = {**values, **{k: counters.get(k, 0) for k in keys}}
        values.setdefault("frames_in_context", self._session.frames_in_context if self._session else 0)
        status = DiagnosticStatus(level=level, name=name, message=message,
                                  hardware_id=self._session_values.get("store_path", ""),
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        if not self.context.ok():
            return
        try:
            self._stats_pub.publish(msg)
        except Exception:  # the context went down between the check and the publish
            pass

    def _publish_intake(self) -> None:
        counters = self.counters()
        self._publish_status("vqa_node: intake", DiagnosticStatus.OK,
                             f"{counters.get('frames_appended', 0)} frames appended, "
                             f"{counters.get('frames_skipped', 0)} skipped, "
                             f"{counters.get('frames_malformed', 0)} malformed", {})

    # -- shutdown -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the worker (a decode stops before its next token), fail waiting questions, close the session.

        Idempotent; destroy_node calls it too.
        """
        worker = getattr(self, "_worker", None)
        with self._lock:
            self._stop = True
            waiting = list(self._asks)
            self._asks.clear()
            self._lock.notify_all()
        for job in waiting:
            response = Ask.Response(success=False, error="node shutting down")
            job.response = response
            job.done.set()
        if worker is not None and worker is not threading.current_thread():
            worker.join()
        if self._session is not None:
            self._session.close()

    def destroy_node(self):
        self.stop()
        return super().destroy_node()


def spin(executor) -> None:
    """`executor.spin()`, surviving rclpy's race after a subscription is destroyed at run time.

    When the camera topics or their reliability change, the node destroys its subscriptions while
    the executor may still be waiting on them; rclpy can then raise InvalidHandle ("destruction was
    requested") out of spin_once (ros2/rclpy#1206), which would end spinning for the whole node.
    That one error is harmless here: the next spin_once builds its wait set from the live entities.
    """
    while executor.context.ok() and not executor._is_shutdown:
        try:
            executor.spin_once()
        except InvalidHandle:
            continue


def main(args=None) -> int:
    """Console entry point `vqa_node`: ROS arguments as usual (--ros-args --params-file FILE -p k:=v).

    Exit status 0 after SIGINT / SIGTERM (also during start-up), 1 when the node cannot start.
    """
    try:
        return run(args)
    except KeyboardInterrupt:  # Ctrl-C before rclpy's signal handlers are installed, or a second one while stopping
        return 0


def run(args=None) -> int:
    """main without its KeyboardInterrupt guard."""
    rclpy.init(args=args)
    node = executor = None
    code = 0
    try:
        executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
        node = VQANode()
        executor.add_node(node)
        spin(executor)
    except (StartupError, ParameterException) as exc:
        reason = " ".join(str(exc).split())
        print(f"{NODE_NAME}: {reason}", file=sys.stderr, flush=True)
        code = 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        if rclpy.ok():
            raise
        # a signal shut the context down while the node was being built: a clean stop as well
    finally:
        if node is not None:
            node.stop()  # first: /ask callbacks waiting for an answer return, so the executor can stop
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
