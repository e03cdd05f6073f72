"""The VQA node over real rclpy and DDS, for tests: the node in its own Context and executor, and a
tester node (`World`) in a second Context (a second DDS participant, as another process would be).

Started by conftest.py's `start_rig` and `rig` fixtures; tests import the helpers (wait_for, feed,
response, publish_until) from here.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.action import ActionClient
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter, parameter_value_to_python
from rclpy.parameter_client import AsyncParameterClient
from rclpy.qos import qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from nchunk_interfaces.action import Ask as AskAction
from nchunk_interfaces.srv import Ask
from nchunk_ros import diagnostics, vqa_node

# First line of a child Python program that a test interrupts with SIGINT: a process started in the
# background by a shell without job control inherits SIGINT ignored, and Python then never raises
# KeyboardInterrupt; the tests are about the program's handling, not about how the run was started.
SIGINT_DEFAULT = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
from nchunk_ros.image_conversion import array_to_compressed, array_to_image
from nchunk_ros.tools.synthetic_camera import random_scene, render_scene

RAW_TOPIC = "/test_cam/image_raw"
COMPRESSED_TOPIC = "/test_cam/image_raw/compressed"
TIMEOUT_S = 20.0  # only reached when something is wrong
REPUBLISH_S = 2.0  # best-effort delivery may drop a message: publish it again, as a camera would


def wait_for(condition, timeout=TIMEOUT_S, what="condition"):
    """condition()'s first true value, polled until `timeout` s (AssertionError naming `what`)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def response(future, timeout=TIMEOUT_S):
    wait_for(future.done, timeout, "an /ask response")
    return future.result()


def publish_until(publish, condition, what):
    """Call publish() until condition() holds, again every REPUBLISH_S, for at most TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        publish()
        try:
            return wait_for(condition, timeout=min(REPUBLISH_S, max(0.0, deadline - time.monotonic())), what=what)
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def feed(tester, node, frames=1, compressed=False, seed=0):
    """Publish frames one by one, each after the previous was appended (depth 1: no overwriting)."""
    for i in range(frames):
        before = node.counters().frames_appended
        publish_until(lambda: tester.publish_frame(seed + i, compressed),
                      lambda: node.counters().frames_appended > before, "a frame to be appended")


class World(Node):
    """The outside world: publishes camera frames, calls /ask (service and action), sets parameters,
    records statistics."""

    def __init__(self, context, service="/ask", node="vqa_node"):
        super().__init__("vqa_tester", context=context)
        self.raw = self.create_publisher(Image, RAW_TOPIC, qos_profile_sensor_data)
        self.compressed = self.create_publisher(CompressedImage, COMPRESSED_TOPIC, qos_profile_sensor_data)
        self.ask_client = self.create_client(Ask, service)
        self.ask_action = ActionClient(self, AskAction, service)
        self.params = AsyncParameterClient(self, node)
        self.statuses = []
        self.reloads = []  # (level, message) of the reload statuses
        self.answers = []
        self.create_subscription(DiagnosticArray, f"/{node}/statistics", self._on_stats, 100)
        self.create_subscription(String, f"/{node}/answer", lambda m: self.answers.append(m.data), 10)
        self.stamp_sec = 1000

    def _on_stats(self, msg):
        for s in msg.status:
            self.statuses.append((s.name, s.level, diagnostics.values_of(s)))
            if s.name == diagnostics.RELOAD:
                self.reloads.append((s.level, s.message))

    def frame_statuses(self):
        return [values for name, level, values in list(self.statuses) if name == diagnostics.FRAME and level == b"\x00"]

    def latest(self, key):
        values = [v[key] for _, _, v in list(self.statuses) if key in v]
        return int(values[-1]) if values else 0

    def publish_frame(self, seed=0, compressed=False):
        rgb = render_scene(random_scene(np.random.default_rng(seed), 96, 64))
        self.stamp_sec += 1
        stamp = Time(sec=self.stamp_sec)
        if compressed:
            self.compressed.publish(array_to_compressed(rgb, "jpeg", stamp=stamp))
        else:
            self.raw.publish(array_to_image(rgb, "rgb8", stamp=stamp))
        return stamp

    def call(self, question="What is there?", **fields):
        return response(self.call_async(question, **fields))

    def call_async(self, question="What is there?", **fields):
        return self.ask_client.call_async(Ask.Request(question=question, **fields))

    def send_goal(self, question, on_feedback, **fields):
        """Send an /ask action goal; its (accepted) goal handle. on_feedback(Ask.Feedback) per feedback."""
        sent = self.ask_action.send_goal_async(AskAction.Goal(question=question, **fields),
                                               feedback_callback=lambda m: on_feedback(m.feedback))
        handle = response(sent)
        assert handle.accepted
        return handle

    def set_params(self, **values):
        future = self.params.set_parameters([v if isinstance(v, Parameter) else Parameter(k, value=v)
                                             for k, v in values.items()])
        wait_for(future.done, what="the parameter service")
        return future.result().results

    def set_params_atomically(self, **values):
        future = self.params.set_parameters_atomically([Parameter(k, value=v) for k, v in values.items()])
        wait_for(future.done, what="the parameter service")
        return future.result().result

    def get_param(self, name):
        future = self.params.get_parameters([name])
        wait_for(future.done, what="the parameter service")
        return parameter_value_to_python(future.result().values[0])


class Rig:
    """A running VQA node (`node`) and `tester`, each spun by its own executor thread."""

    def __init__(self, store, domain_id: int, name="vqa_node", service="/ask", ros_args=(), **overrides):
        """`overrides`: parameter values given to the node (as a launch file does); `ros_args`: more
        command-line ROS arguments (such as "-p", "max_frames:=3")."""
        self._contexts = node_ctx, tester_ctx = Context(), Context()
        for ctx in self._contexts:
            rclpy.init(args=[], context=ctx, domain_id=domain_id, signal_handler_options=SignalHandlerOptions.NO)
        values = {"store_path": str(store), "image_topics": [RAW_TOPIC, COMPRESSED_TOPIC],
                  "max_append_rate_hz": 50.0, "max_new_tokens": 4, "sparsity": 0.5, **overrides}
        remap = ["--ros-args", "-r", f"__node:={name}", "-r", f"/ask:={service}", *ros_args]
        self.node = vqa_node.VQANode(context=node_ctx, cli_args=remap,
                                     parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])
        node_exec = MultiThreadedExecutor(num_threads=vqa_node.EXECUTOR_THREADS, context=node_ctx)
        node_exec.add_node(self.node)
        self.tester = World(tester_ctx, service=service, node=name)
        tester_exec = MultiThreadedExecutor(num_threads=2, context=tester_ctx)
        tester_exec.add_node(self.tester)
        self._executors = (tester_exec, node_exec)
        self._threads = [threading.Thread(target=vqa_node.spin, args=(e,), daemon=True) for e in self._executors]
        for t in self._threads:
            t.start()
        tester = self.tester
        assert tester.ask_client.wait_for_service(timeout_sec=TIMEOUT_S), "no /ask service"
        assert tester.ask_action.wait_for_server(timeout_sec=TIMEOUT_S), "no /ask action server"
        assert tester.params.wait_for_services(timeout_sec=TIMEOUT_S), "no parameter services"
        wait_for(lambda: tester.raw.get_subscription_count() and tester.compressed.get_subscription_count(),
                 what="the node's camera subscriptions")

    def stop(self):
        self.tester.ask_action.destroy()
        for e in self._executors:
            e.shutdown()
        self.tester.destroy_node()
        self.node.destroy_node()
        for ctx in reversed(self._contexts):
            rclpy.try_shutdown(context=ctx)
        for t in self._threads:
            t.join(timeout=10)
