"""Streaming: step() equals forward() at every position; the state does not grow. (The one-step
update kernels themselves: tests/test_state_update.py.)"""

from __future__ import annotations

import pytest
import torch

from tests.test_model import make_model


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("position_embedding", [False, True])
def test_step_equals_forward_at_every_position(num_layers, position_embedding):
    L = 45
    model = make_model(n_items=60, max_len=L, num_layers=num_layers, position_embedding=position_embedding,
                       scan_impl="torch", hidden_size=32, d_state=8).eval()
    torch.manual_seed(3)
    seq = torch.randint(1, 60, (3, L))
    state = model.init_state(3)
    sizes = None
    for t in range(L):
        out, state = model.step(seq[:, t], state)
        with torch.no_grad():
            full = model(seq[:, : t + 1], torch.full((3,), t + 1))
        torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-4)
        now = [x.numel() for x in state.conv + state.ssm]
        assert sizes is None or now == sizes  # constant state: O(1) per step
        sizes = now


def test_step_refuses_bad_ids_and_overlong_positions():
    model = make_model(n_items=20, max_len=3, position_embedding=True).eval()
    state = model.init_state(2)
    with pytest.raises(ValueError, match="internal ids in 1..19"):
        model.step(torch.tensor([0, 5]), state)
    with pytest.raises(ValueError, match="must be \\[B\\] with B=2"):
        model.step(torch.tensor([1]), state)
    for _ in range(3):
        model.step(torch.tensor([1, 2]), state)
    with pytest.raises(ValueError, match="max_seq_length=3"):
        model.step(torch.tensor([1, 2]), state)
