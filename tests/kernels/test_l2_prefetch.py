"""The L2 prefetch kernel (`specray.kernels.l2_prefetch`): it reads exactly the requested bytes and changes
nothing but its sink. Without CUDA it runs under Triton's CPU interpreter. The oracle: a block whose int32
words sum to the sink's trigger value makes the kernel store that sum, so the loads really happened (and
nowhere else)."""

import pytest
import torch

from specray.config import EngineConfig
from specray.errors import ConfigError
from specray.kernels.l2_prefetch import _BLOCK, l2_prefetch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRIGGER = 0x7FFFFFFF


def test_the_loads_happen_within_the_requested_bytes_and_change_nothing():
    words = torch.zeros(3 * _BLOCK, dtype=torch.int32)
    words[_BLOCK + 5] = TRIGGER  # block 1 sums to the trigger
    weight = words.view(torch.bfloat16).to(DEVICE)  # [6 * _BLOCK] bf16, same bytes
    before = weight.clone()
    sink = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    l2_prefetch(weight, 4 * _BLOCK, sink)  # only block 0
    assert int(sink.item()) == 0
    l2_prefetch(weight, 2 * 4 * _BLOCK + 2, sink)  # blocks 0-1 (the 2 extra bytes are not a whole word)
    assert int(sink.item()) == TRIGGER
    assert torch.equal(weight.view(torch.int16), before.view(torch.int16))
    sink.zero_()
    l2_prefetch(weight, 1 << 40, sink)  # capped at the weight's size
    assert int(sink.item()) == TRIGGER


def test_refuses_a_strided_weight_and_checks_the_config():
    sink = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        l2_prefetch(torch.zeros(8, 8, dtype=torch.bfloat16, device=DEVICE).t(), 64, sink)
    with pytest.raises(ConfigError, match="tp_weight_prefetch_mb"):
        EngineConfig(tp_weight_prefetch_mb=-1)
    assert EngineConfig(tp_weight_prefetch_mb=0).tp_weight_prefetch_mb == 0
