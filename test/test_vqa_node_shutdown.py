"""SIGINT in the middle of a long frame append: the VQA node process stops at the next layer
boundary and exits 0, without finishing the append, and the question waiting behind the append is
answered "node shutting down".

The model makes one append long on a small CPU with a small store: a SmolVLM whose processor scales
a frame to a longest edge of 1024 px and splits it into 64 px tiles (the test's 96x64 frame: 176
tiles and a global one, 2832 visual tokens, 4988 tokens with the tile markers) and whose language
backbone is 60 thin layers (hidden 128), so attention over the frame's tokens costs about a second
per layer here, about a minute per frame, while the store is 32 MB.
"""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 (rclpy) is not installed")

from rclpy.context import Context  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.signals import SignalHandlerOptions  # noqa: E402

from nchunk_core.io.latency import LatencyTable  # noqa: E402
from nchunk_core.io.profile import cache_path  # noqa: E402
from ros_rig import RAW_TOPIC, World, publish_until, response, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90.0  # only reached when something is wrong
STOP_BOUND_S = 30.0  # generous: a layer takes about a second here, the whole append over a minute
LAYERS, HIDDEN, TILE, LONGEST_EDGE = 60, 128, 64, 1024


def build_slow_store(out: Path) -> Path:
    """The model of the module docstring, random weights in fp16, converted without calibration."""
    import torch
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from nchunk_core.convert.converter import convert
    from nchunk_core.runtime.processors import ImageOnlySmolVLMProcessor
    from nchunk_core.testing.tiny_models import VOCAB_SIZE, build_tokenizer

    tok = build_tokenizer("smolvlm")
    config = SmolVLMConfig(
        text_config=dict(model_type="llama", hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                         num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=16384, vocab_size=VOCAB_SIZE, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=TILE, patch_size=8),  # 64 patches per tile, 16 tokens after the shuffle
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    images = SmolVLMImageProcessorPil(size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": TILE},
                                      do_image_splitting=True)
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration(config).eval().to(torch.float16)
    model.save_pretrained(out / "checkpoint")
    ImageOnlySmolVLMProcessor(image_processor=images, tokenizer=tok, image_seq_len=16).save_pretrained(
        out / "checkpoint")
    return convert(out / "checkpoint", out / "store", reorder=False, progress=False)


@pytest.fixture(scope="module")
def slow_store(ros_env, tmp_path_factory):
    store = build_slow_store(tmp_path_factory.mktemp("slow"))
    LatencyTable.synthetic().save(cache_path(store, 6))
    return store


def test_sigint_during_a_long_frame_append_stops_at_a_layer_and_exits_0(slow_store, ros_env):
    domain = (int(ros_env["ROS_DOMAIN_ID"]) + 7) % 200 + 20
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "nchunk_ros.vqa_node", "--ros-args", "-p", f"store_path:={slow_store}",
                             "-p", f"image_topics:=[{RAW_TOPIC}]"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    ctx = Context()
    rclpy.init(args=[], context=ctx, domain_id=domain, signal_handler_options=SignalHandlerOptions.NO)
    tester = World(ctx)
    executor = MultiThreadedExecutor(num_threads=2, context=ctx)
    executor.add_node(tester)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        wait_for(lambda: any("ready: /ask served" in line for line in lines), START_TIMEOUT_S, "the node to start")
        assert tester.ask_client.wait_for_service(timeout_sec=START_TIMEOUT_S)
        publish_until(lambda: tester.publish_frame(seed=3) and None, lambda: tester.latest("frames_received") >= 1,
                      "the frame to arrive")
        question = tester.call_async("What is there?")  # waits behind the append
        wait_for(lambda: tester.latest("asks_waiting") == 1, what="the question to wait behind the append")
        assert tester.latest("frames_appended") == 0  # the append is running
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        answer = response(question, timeout=STOP_BOUND_S)
        proc.wait(timeout=STOP_BOUND_S)
        stopped_s = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
        executor.shutdown()
        tester.destroy_node()
        rclpy.try_shutdown(context=ctx)
        reader.join(timeout=10)
    log = "".join(lines)
    print(f"the node exited {stopped_s:.1f} s after SIGINT, in the middle of a frame append")
    assert proc.returncode == 0, log
    assert not answer.success and answer.error == "node shutting down"
    assert f"frame from {RAW_TOPIC} not appended: the node is shutting down" in log
    assert tester.frame_statuses() == [] and tester.latest("frames_appended") == 0  # the append never completed
    assert "Traceback" not in log and "terminate called" not in log
    assert stopped_s < STOP_BOUND_S
