"""What `vramplan train` prints is its own: the libraries' tqdm bars ("Loading weights") and
transformers' notice about image processors without torchvision stay out of the terminal, where
they broke into train's progress line."""

import os
import subprocess
import sys


def test_train_prints_no_library_progress_bars(tiny, kit, tmp_path):
    model, images = tiny
    plan = kit.plan(tmp_path / "plan.json", kit.spec(model, method="lora", rank=4))
    done = subprocess.run([sys.executable, "-m", "vramplan", "train", "--plan", str(plan), "--model", str(model),
                           "--data", str(images), "--output", str(tmp_path / "run"), "--steps", "1",
                           "--checkpoint-every", "0", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed
    assert "pytorch_lora_weights.safetensors" in printed            # train's own report is there
    assert "loading peak" in printed and "steps only" in printed, printed   # loading kept apart
    assert "Loading weights" not in printed and "it/s]" not in printed, printed
    assert "requires torchvision" not in printed, printed


def test_the_int8_cast_notice_is_said_once():
    """bitsandbytes logs its input cast at every int8 matmul; train lets the first through."""
    import logging

    from vramplan.step.loading import quiet_libraries

    quiet_libraries()
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    handler = Keep()
    logger.addHandler(handler)
    try:
        for _ in range(3):
            logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
        logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.bfloat16")
        logger.warning("something else")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert records == ["MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization",
                       "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 during quantization",
                       "something else", "something else"]
