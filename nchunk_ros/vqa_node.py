"""The VQA node: camera frames go into a frame-appending session, questions are answered over /ask.

    ros2 launch nchunk_ros vqa.launch.py                       # the built-in model, config/vqa.yaml
    ros2 launch nchunk_ros vqa.launch.py params_file:=my.yaml  # your store and settings
    vqa_node --ros-args --params-file config/vqa.yaml -p store_path:=/nvme/store   # without `launch`

Interfaces (node name `vqa_node`):

- subscribes to every topic in `image_topics`: a name ending in `/compressed` carries
  sensor_msgs/CompressedImage (image_transport's naming), any other sensor_msgs/Image. Depth-1
  sensor-data QoS, reliability from `qos_reliability`.
  A frame's stamp is its header.stamp, or its arrival time when the publisher left the stamp zero.
- serves `/ask` (nchunk_interfaces/srv/Ask; every field is documented in Ask.srv), and the `/ask`
  action (nchunk_interfaces/action/Ask: feedback per answer token, cancel; ask_action.py). The
  service's queue keeps every request of a burst (KEEP_ALL), so each gets a response: answered,
  busy or timed out.
- publishes each successful answer's text on `~/answer` (std_msgs/String) and statistics on
  `~/statistics` (diagnostic_msgs/DiagnosticArray; names and keys in diagnostics.py): after every
  frame append, once a second (intake counters; WARN naming the camera topics that have publishers
  but sent no frame for camera_transport.SILENCE_S seconds, or that have more than one publisher, each
  also logged once) and after a model reload.

The node is a shell around three parts:

- parameters.py: the parameter table and `check_parameters`, registered before the parameters are
  declared, so start-up values and every change are checked, with a reason on refusal;
- worker.py: one worker thread owns the session. Camera callbacks only convert the message
  (malformed ones are counted and logged, throttled) and put the frame in a one-slot mailbox; /ask
  callbacks (their own reentrant callback group) queue a job and wait for it until its deadline
  (`timeout_s` of the request, else `ask_timeout_s`). The worker's order: a model reload, then the
  newest frame when `max_append_rate_hz` makes it due, before the next question (worker.py);
- session_tasks.py: what the worker does with the session (appending, answering, reloading).

Parameters (config/vqa.yaml documents each) apply without a restart. The selection settings
(sparsity, method, chunk_*) and max_frames apply from the next frame or question (a max_frames
below the frames in context makes the next frame rebuild the context); frame_tokens applies from
the next frame (frames in context keep their tokens) and decoding from the next question, each
refused at once with the reason when the running model has no such mode or generation settings; image_topics and
qos_reliability re-subscribe at once; max_append_rate_hz, max_new_tokens and ask_timeout_s apply at
once (max_new_tokens up to what the model holds). store_path, device, dtype and reader_threads
reload the model, also when set to the value they have (a store replaced on disk is opened again):
a store_path that is not a directory with a manifest.json is refused at once; otherwise the worker
opens a new session with the new values and only then closes the old one (session_tasks.py); the
context starts again from the newest camera frame.

An empty store_path opens the built-in demo model's store. sparsity, method, max_frames and
max_new_tokens take the store's recommended value unless the user sets them (store_settings.py).

`main` first points Fast DDS at the node's camera profile (camera_transport.py), so that large
best-effort frames from other processes arrive. Start-up opens the store, loads the drive profile
of the store's drive from the cache or measures a quick one (progress in the log), and builds the
model. A missing or bad store, or a bad parameter value, ends the process with exit code 1 and a
one-line reason on stderr. SIGINT and SIGTERM stop it cleanly with exit code 0, also during start-up
(a Ctrl-C while the module's imports load included); a frame append or an answer in progress stops
at its next layer boundary (shutdown.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

try:  # these take about half a second to load: a Ctrl-C meanwhile ends the vqa_node program quietly
    import math
    import os
    import time
    import traceback

    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
    from rclpy.exceptions import ParameterException
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import String

    from nchunk_interfaces.srv import Ask

    from nchunk_ros import camera_transport, diagnostics
    from nchunk_ros.entry_args import check_arguments
    from nchunk_ros.ask_action import AskActionServer
    from nchunk_ros.image_conversion import message_to_rgb
    from nchunk_ros.parameters import (PARAMETERS, RELOAD_PARAMETERS, SELECTION_PARAMETERS, SESSION_PARAMETERS,
                                       SUBSCRIPTION_PARAMETERS, check_parameters, selection_from)
    from nchunk_ros.session_tasks import SessionTasks, StartupError, stamp_seconds
    from nchunk_ros.shutdown import StopSignals, spin, stop_while_spinning
    from nchunk_ros.store_opening import open_session
    from nchunk_ros.store_settings import StoreSettings
    from nchunk_ros.worker import MAX_WAITING_ASKS, AskJob, Counters, Frame, Worker, failed
except KeyboardInterrupt:
    if __name__ != "__main__" and Path(sys.argv[0]).name != "vqa_node":
        raise  # imported by another program: the interrupt is that program's
    sys.exit(0)

NODE_NAME = "vqa_node"
USAGE = """vqa_node [-h] [--ros-args [--params-file FILE] [-p NAME:=VALUE ...]]
ros2 launch nchunk_ros vqa.launch.py [params_file:=FILE]"""
SUMMARY = ("Answers questions about what the cameras see with a vision-language model whose backbone "
           "is read from the drive, row by row, for every frame and layer. Subscribes to image_topics, "
           "serves /ask (nchunk_interfaces/srv/Ask and action/Ask; `nchunk ask \"...\"` from a shell), and "
           "publishes ~/answer and ~/statistics. Every parameter below also applies live, with `ros2 param "
           "set /vqa_node NAME VALUE`.")
EPILOG = ("config/vqa.yaml documents every parameter; `nchunk convert MODEL_DIR STORE` makes a store from a "
          "Hugging Face checkpoint. Exit status: 0 after Ctrl-C or SIGTERM, 1 when the node cannot start "
          "(the reason on stderr), 2 for a bad command line.")
SERVICE = "/ask"
MAX_QUESTION_CHARS = 4000  # longer questions are refused before they reach the tokenizer
EXECUTOR_THREADS = MAX_WAITING_ASKS + 6  # waiting /ask calls and goals + the running one + camera, timer, params, action
STATS_PERIOD_S = 1.0
MALFORMED_LOG_PERIOD_S = 5.0
QOS_RELIABILITY = {"best_effort": ReliabilityPolicy.BEST_EFFORT, "reliable": ReliabilityPolicy.RELIABLE}
# /ask keeps every request of a burst (the default depth of 10 drops the rest before the node sees them)
SERVICE_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)


def topic_type(topic: str):
    """CompressedImage for a topic named like image_transport's compressed transport, else Image."""
    return CompressedImage if topic.rstrip("/").endswith("/compressed") else Image


class VQANode(Node):
    """Camera frames into a Session, /ask answered from the frames in context (module docstring)."""

    def __init__(self, **node_options):
        super().__init__(NODE_NAME, **node_options)
        self._settings = StoreSettings(self._parameter_overrides)  # what was given at start-up
        self._running = False  # the session is open: parameter changes apply to it
        self._values: dict = {}
        self._tasks: SessionTasks | None = None
        self._frame_listeners = []
        self._camera_subscriptions = []
        self._watch = camera_transport.SilenceWatch()
        self._worker = Worker(lambda text: self.get_logger().error(text))

        self.add_on_set_parameters_callback(self._validate)  # before declaring: start-up values too
        self.add_post_set_parameters_callback(self._apply)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, spec.descriptor())

        self._worker.set_append_rate(self._values["max_append_rate_hz"])
        self._tasks = SessionTasks(self, self._worker, self.open_session(self._values), self._values)
        self._running = True
        self._answer_pub = self.create_publisher(String, "~/answer", 10)
        self._stats_pub = self.create_publisher(DiagnosticArray, "~/statistics", 10)
        self.get_logger().info(camera_transport.describe())
        self._subscribe()
        self._service = self.create_service(Ask, SERVICE, self._on_ask, qos_profile=SERVICE_QOS,
                                            callback_group=ReentrantCallbackGroup())
        self._action = AskActionServer(self, self.resolve_service_name(SERVICE), self._worker)
        self._timer = self.create_timer(STATS_PERIOD_S, self._publish_intake,
                                        callback_group=MutuallyExclusiveCallbackGroup())
        self._tasks.clamp_max_new_tokens(reloaded=True)
        self._worker.start(self._tasks)
        self.get_logger().info(f"ready: /ask served, listening on {', '.join(self._values['image_topics'])}")

    @property
    def session(self):
        """The Session the node answers from (owned by the node's worker thread: read-only use)."""
        return None if self._tasks is None else self._tasks.session

    def parameter_values(self) -> dict:
        """A copy of the node's parameter values."""
        return dict(self._values)

    def counters(self) -> Counters:
        """The intake, reload and /ask counters now."""
        return self._worker.counters()

    def add_frame_listener(self, listener) -> None:
        """listener(topic, FrameStats) is called on the worker thread after every frame appended."""
        self._frame_listeners.append(listener)

    # -- parameters ---------------------------------------------------------------------------------
    def _validate(self, params):
        changes = {p.name: p.value for p in params}
        limit = self.session.max_answer_tokens if self._running else None
        model_check = self._tasks.model_problem if self._running else None
        return check_parameters(changes, dict(self._values), self._running, limit, model_check)

    def _apply(self, params) -> None:
        try:
            self._apply_values(params)
        except Exception:  # validated already, so this is a bug: log it, keep the node up
            self.get_logger().error("applying a parameter change failed:\n" + traceback.format_exc())
            if not self._running:
                raise

    def _apply_values(self, params) -> None:
        changed = {p.name for p in params if self._values.get(p.name) != p.value}
        reopen = ({p.name for p in params} - changed) & set(RELOAD_PARAMETERS)  # set to the value they have
        for p in params:
            self._values[p.name] = p.value
        if self._running:
            self._settings.changed(p.name for p in params)
        if not self._running or not (changed or reopen):
            return
        v = self._values
        if changed & set(SESSION_PARAMETERS):  # frame_tokens and decoding: for the model a reload opens
            self._tasks.update_session(v, model_settings=not (changed | reopen) & set(RELOAD_PARAMETERS))
        if changed & set(SELECTION_PARAMETERS):
            windows = selection_from(v).windows
            self.get_logger().info(f"selection from the next frame: {v['method']} at sparsity {v['sparsity']:g}"
                                   + ("" if windows is None else f", windows {windows}"))
        for name, when in (("max_frames", "frame"), ("frame_tokens", "frame"), ("decoding", "question")):
            if name in changed:
                self.get_logger().info(f"{name} {v[name]!r} from the next {when}")
        if "max_append_rate_hz" in changed:
            self._worker.set_append_rate(v["max_append_rate_hz"])
        if changed & set(SUBSCRIPTION_PARAMETERS):
            self._subscribe()
        if (changed | reopen) & set(RELOAD_PARAMETERS):  # a change back to the running session's values
            wanted = {k: v[k] for k in RELOAD_PARAMETERS} != self._tasks.session_values  # cancels a reload
            self._worker.request_reload(dict(v) if wanted or reopen else None, reopen=bool(reopen))

    # -- opening the store (start-up and reloads) ----------------------------------------------------
    def open_session(self, v: dict):
        """A Session opened with the parameter values `v` (store_opening.py); StartupError with the reason."""
        return open_session(self, v, self._settings, lambda: self._worker.stopping)

    # -- camera -------------------------------------------------------------------------------------
    def _subscribe(self) -> None:
        for sub in self._camera_subscriptions:
            self.destroy_subscription(sub)
        # a new group each time: rclpy can leave a group locked by an event of a destroyed subscription
        self._camera_group = MutuallyExclusiveCallbackGroup()
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, durability=DurabilityPolicy.VOLATILE,
                         reliability=QOS_RELIABILITY[self._values["qos_reliability"]])
        self._camera_subscriptions = [
            self.create_subscription(topic_type(topic), topic, lambda msg, t=topic: self._on_image(msg, t),
                                     qos, callback_group=self._camera_group)
            for topic in self._values["image_topics"]]
        self._watch.restart(self._values["image_topics"])
        self.get_logger().info("camera: " + ", ".join(
            f"{t} ({topic_type(t).__name__}, {self._values['qos_reliability']})" for t in self._values["image_topics"]))

    def _on_image(self, msg, topic: str) -> None:
        arrival = time.monotonic()
        self._worker.count("frames_received")
        self._watch.frame(topic, arrival)
        try:
            rgb = message_to_rgb(msg)
        except Exception as exc:  # ValueError for every malformed message; nothing may stop the intake
            count = self._worker.count("frames_malformed")
            self.get_logger().warning(f"malformed image on {topic} ignored ({count} so far): {exc}",
                                      throttle_duration_sec=MALFORMED_LOG_PERIOD_S)
            return
        stamp = msg.header.stamp
        if stamp.sec == 0 and stamp.nanosec == 0:  # publisher left it unset: use the arrival time
            stamp = self.get_clock().now().to_msg()
        self._worker.offer_frame(Frame(rgb, stamp_seconds(stamp), topic, arrival))

    # -- /ask ---------------------------------------------------------------------------------------
    def _on_ask(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        return self.serve(request, time.monotonic())

    def serve(self, request: Ask.Request, arrival: float, on_token=None, queued=None) -> Ask.Response:
        """Check `request`, queue it for the worker and wait for its response (the /ask service and
        action). `on_token(answer so far, tokens)`: after every answer token; `queued(job)`: the job,
        before it is queued (so that it can be canceled)."""
        try:
            error = self._check_request(request)
            if error:
                self._worker.count("asks_refused")
                return failed(Ask.Response(), error, arrival)
            timeout = request.timeout_s if request.timeout_s > 0 else self._values["ask_timeout_s"]
            job = AskJob(request, arrival, arrival + timeout, timeout, on_token=on_token)
            if queued is not None:
                queued(job)
            return self._worker.ask(job)
        except Exception as exc:  # a bug here must not take the node down with it
            self.get_logger().error("/ask failed:\n" + traceback.format_exc())
            self._worker.count("asks_failed")
            return failed(Ask.Response(), f"internal error: {type(exc).__name__}: {exc}", arrival)

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
        if not self._worker.frame_seen:  # otherwise the worker appends a waiting frame before answering
            return f"no camera frame yet (listening on {', '.join(self._values['image_topics'])})"
        return ""

    # -- publishing ---------------------------------------------------------------------------------
    def frame_appended(self, topic: str, stats) -> None:
        """Publish the statistics of a frame appended and hand them to the frame listeners."""
        self.publish_status(diagnostics.FRAME, DiagnosticStatus.OK, diagnostics.frame_message(stats),
                            diagnostics.frame_values(topic, stats, self.session.config))
        for listener in self._frame_listeners:
            listener(topic, stats)

    def publish_status(self, name: str, level: bytes, message: str, values: dict) -> None:
        session = self.session
        msg = diagnostics.status_array(name, level, message, values, self.counters(),
                                       session.frames_in_context if session else 0,
                                       str(session.store.path) if session else "")
        msg.header.stamp = self.get_clock().now().to_msg()
        self._publish(self._stats_pub, msg)

    def publish_answer(self, text: str) -> None:
        self._publish(self._answer_pub, String(data=text))

    def _publish(self, publisher, msg) -> None:
        if not self.context.ok():
            return
        try:
            publisher.publish(msg)
        except Exception:  # the context went down between the check and the publish
            pass

    def _publish_intake(self) -> None:
        silent = self._watch.check(self, self._values["qos_reliability"])
        shared = self._watch.shared
        self.publish_status(diagnostics.INTAKE, DiagnosticStatus.WARN if silent or shared else DiagnosticStatus.OK,
                            diagnostics.intake_message(self.counters(), silent, shared),
                            {"silent_topics": ",".join(silent), "shared_topics": ",".join(shared)})

    # -- shutdown -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the worker (a decode stops before its next token), fail waiting questions, close the session.

        Idempotent; destroy_node calls it too.
        """
        self._worker.stop()
        if self.session is not None:
            self.session.close()

    def destroy_node(self):
        self.stop()
        if getattr(self, "_action", None) is not None:
            self._action.destroy()
        return super().destroy_node()


def main(args=None) -> int:
    """Console entry point `vqa_node`: ROS arguments as usual (--ros-args --params-file FILE -p k:=v).

    Exit status 0 after SIGINT / SIGTERM (also during start-up) and after --help, 1 when the node cannot
    start, 2 for an argument before --ros-args.
    """
    argv = sys.argv if args is None else args
    code = check_arguments(argv, NODE_NAME, USAGE, SUMMARY, PARAMETERS, EPILOG)
    if code is not None:
        return code
    try:
        return run(args)
    except KeyboardInterrupt:  # Ctrl-C before rclpy's signal handlers are installed, or a second one while stopping
        return 0


def run(args=None) -> int:
    """main without its KeyboardInterrupt guard."""
    camera_transport.apply_camera_transport_profile(os.environ)  # read when rclpy.init creates DDS
    signals = StopSignals()
    signals.install()
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node = executor = None
    code = 0
    try:
        executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
        node = VQANode()
        executor.add_node(node)
        signals.node_running()
        spin(executor, until=signals.requested.is_set)
        node.get_logger().info("stopping: a frame append or answer in progress stops at its next layer")
        stop_while_spinning(node, executor)
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
        signals.restore()
    return code


if __name__ == "__main__":
    sys.exit(main())
