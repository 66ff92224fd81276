"""kernels.fast_dropout: nn.Dropout's semantics (rate, scale, gradient, eval identity) from a
compiled, counter-based mask seeded by torch's generator, repeatable under torch.manual_seed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamba4rec.kernels import fast_dropout
from mamba4rec.kernels.fast_dropout import FastDropout
from tests.conftest import count_applies

pytest.importorskip("numba", reason="the compiled dropout needs numba (the fast extra)")
#: The compiled kernels run in parallel: two threads, as the numba path gets on a 2-core machine.
pytestmark = pytest.mark.usefixtures("two_threads")

N = 1 << 20


@pytest.fixture
def compiled_calls(monkeypatch):
    return count_applies(monkeypatch, fast_dropout._Dropout)


@pytest.mark.parametrize("p", [0.2, 0.4, 0.5])
def test_rate_scale_and_expectation(p, compiled_calls):
    torch.manual_seed(0)
    x = torch.ones(N)
    y = FastDropout(p).train()(x)
    assert compiled_calls
    q = round(p * 2**15) / 2**15                      # p to the nearest 2^-15
    kept = y != 0
    sigma = (q * (1 - q) / N) ** 0.5
    assert abs((1 - kept.float().mean().item()) - q) < 5 * sigma
    assert torch.all(y[kept] == torch.tensor(1 / (1 - q), dtype=torch.float32))
    assert abs(y.mean().item() - 1.0) < 5 * sigma / (1 - q)
    # each 64-bit hash serves four elements, one 16-bit quarter each, a quarter of a block
    # apart (the elements past the last whole block: four neighbours): every quarter drops at
    # rate q, and the four elements of one hash drop independently of each other
    blocks = kept[:N // fast_dropout._BLOCK * fast_dropout._BLOCK].view(-1, 4, fast_dropout._BLOCK // 4)
    for r in range(4):
        assert abs((1 - blocks[:, r].float().mean().item()) - q) < 5 * 2 * sigma, r
    both = (~blocks[:, 0] & ~blocks[:, 3]).float().mean().item()
    assert abs(both - q * q) < 5 * 2 * (q * q * (1 - q * q) / (N / 4)) ** 0.5


def _reference_mask(seed, n, threshold):
    """The kept elements as the module docstring defines them, in plain Python integers."""
    m64 = (1 << 64) - 1

    def hash64(j):
        z = (seed + j * 0x9E3779B97F4A7C15) & m64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        return z ^ (z >> 31)

    block, q = fast_dropout._BLOCK, fast_dropout._BLOCK // 4
    keep = []
    for i in range(n):
        if i < n // block * block:
            c, r, k = i // block, i % block // q, i % q
            bits = hash64(c * q + k) >> (16 * r)
        else:
            bits = hash64(i >> 2) >> (16 * (i & 3))
        keep.append((bits & 0x7FFF) >= threshold)
    return torch.tensor(keep)


def test_mask_is_the_documented_hash_bit_for_bit(compiled_calls, monkeypatch):
    n = 2 * fast_dropout._BLOCK + 777                     # two whole blocks and a tail
    seed = 0x7EDCBA9876543210                             # random_() on int64 draws from [0, 2^63)
    monkeypatch.setattr(torch.Tensor, "random_", lambda t: t.fill_(seed))
    p = 0.3
    x = torch.ones(n, requires_grad=True)
    y = FastDropout(p).train()(x)
    assert compiled_calls
    expected = _reference_mask(seed, n, fast_dropout._threshold(p))
    assert torch.equal(y.detach() != 0, expected)
    y.backward(torch.ones(n))
    assert torch.equal(x.grad != 0, expected)              # the backward makes the same mask


def test_a_double_backward_raises():
    x = torch.randn(20_000, requires_grad=True)
    y = FastDropout(0.2).train()(x)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_elements_past_the_last_whole_block(compiled_calls):
    torch.manual_seed(2)
    n = 3 * fast_dropout._BLOCK + 4001
    y = FastDropout(0.5).train()(torch.ones(n))
    tail = y[3 * fast_dropout._BLOCK:] != 0
    assert 1700 < int(tail.sum()) < 2300                              # 4,001 elements at p = 0.5
    for phase in range(4):                                            # each quarter of a hash
        assert 350 < int(tail[phase::4].sum()) < 650, phase
    groups = tail[:4000].view(-1, 4).sum(dim=1)                       # one hash's four elements:
    assert int(((groups == 0) | (groups == 4)).sum()) < 250           # all alike 1/8 of the time
    assert compiled_calls


def test_gradient_is_the_same_mask_and_scale(compiled_calls):
    torch.manual_seed(1)
    x = torch.randn(64, 50, 255, requires_grad=True)  # not a whole number of blocks
    y = FastDropout(0.3).train()(x)
    g = torch.randn_like(y)
    y.backward(g)
    assert compiled_calls
    kept = y.detach() != 0
    scale = y.detach()[kept] / x.detach()[kept]
    torch.testing.assert_close(scale, torch.full_like(scale, scale[0].item()))
    torch.testing.assert_close(x.grad, torch.where(kept, g * scale[0], torch.zeros_like(g)))


def test_repeatable_under_the_seed_independent_of_threads_and_fresh_per_call(compiled_calls):
    x = torch.randn(300_000)
    d = FastDropout(0.2).train()
    saved = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(7)
            outs.append((d(x), d(x)))
    finally:
        torch.set_num_threads(saved)
    (a1, b1), (a2, b2) = outs
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1 != 0, b1 != 0)  # a new mask every call
    assert compiled_calls


def test_other_cases_are_torch_dropout(compiled_calls):
    d = FastDropout(0.2)
    x = torch.randn(N)
    assert torch.equal(d.eval()(x), x)                                   # eval: identity
    d.train()
    assert torch.equal(FastDropout(0.0).train()(x), x)
    small = torch.randn(100)
    torch.manual_seed(3)
    expected = F.dropout(small, 0.2, True)
    torch.manual_seed(3)
    assert torch.equal(d(small), expected)                               # small: F.dropout
    assert d(x.double()).dtype == torch.float64                          # float64: F.dropout
    assert torch.count_nonzero(FastDropout(1.0).train()(x)) == 0
    assert not compiled_calls


def test_env_switch_gives_torch_dropout(monkeypatch, compiled_calls):
    monkeypatch.setenv("MAMBA4REC_FAST_DROPOUT", "0")
    x = torch.randn(N)
    torch.manual_seed(4)
    expected = F.dropout(x, 0.2, True)
    torch.manual_seed(4)
    assert torch.equal(FastDropout(0.2).train()(x), expected) and not compiled_calls


def test_model_state_dict_is_unchanged_by_the_dropout_class():
    from tests.test_model import make_model

    model = make_model(n_items=30, max_len=10)
    assert not any("dropout" in k for k in model.state_dict())
    assert isinstance(model.dropout, torch.nn.Dropout) and isinstance(model.dropout, FastDropout)
