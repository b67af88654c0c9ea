"""The method registry, the safetensors size arithmetic, and the no-torch rule."""

import os
import subprocess
import sys

import pytest
import torch

from vramplan.methods import MethodImpl, get_method, register_method, registered_methods, safetensors_file_bytes
from vramplan.spec import Method


def test_every_method_is_registered_once():
    assert set(registered_methods()) == set(Method)
    for method in Method:
        impl = get_method(method)
        assert isinstance(impl, MethodImpl) and impl.method is method


def test_registering_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method.LORA, type(get_method(Method.LORA)))


def test_analytic_methods_do_not_import_torch():
    code = ("import sys, vramplan.methods, vramplan.estimate.optimizer; "
            "sys.exit('torch' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


CASES = [
    ({}, None),
    ({"a": (3,)}, None),
    ({"b": (2, 3), "a": (1,), "c.lora_A.weight": (16, 320)}, {"format": "pt"}),
    ({"x": (), "zero": (0, 4), 'q"uote\\': (5,), "é-ünï": (7, 7)}, {"format": "pt", "k": "v\n"}),
    ({f"unet.block.{i}.w": (i + 1, 9) for i in range(130)}, {"format": "pt"}),  # offsets of many digits
]


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("tensors,metadata", CASES)
def test_safetensors_size_matches_real_files(tmp_path, tensors, metadata, dtype):
    from safetensors.torch import save_file

    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    path = tmp_path / "t.safetensors"
    save_file({k: torch.zeros(s, dtype=torch_dtype) for k, s in tensors.items()}, str(path), metadata=metadata)
    assert os.path.getsize(path) == safetensors_file_bytes(tensors.items(), dtype, metadata)
