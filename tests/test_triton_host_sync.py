"""A fused Triton layer's forward and backward read no tensor value on the host (each read is a device sync on a
GPU), and spike-ness comes from the dtype or a fused layer's mark, never from scanning values."""
import pytest
import torch
from helpers import randn, spikes

from binwslt import functional as Fn
from binwslt.config import LIFConfig
from binwslt.spikes import is_spikes, mark_spikes

pytest.importorskip("triton")

_SYNCS = ("item", "__int__", "__float__", "__bool__", "__index__", "tolist", "numpy")


@pytest.fixture
def no_host_reads(monkeypatch):
    """Within the test, any Tensor.item()/int()/float()/bool()/tolist()/numpy() raises; yields the list of calls."""
    calls = []

    def trap(name):
        def raise_sync(self, *args, **kwargs):
            calls.append(name)
            raise AssertionError(f"host read of a tensor value: Tensor.{name}")
        return raise_sync

    for name in _SYNCS:
        monkeypatch.setattr(torch.Tensor, name, trap(name))
    yield calls
    monkeypatch.undo()


def _two_layers(x, w1, s1, w2, s2, bn1, bn2):
    neuron = LIFConfig(decay=0.5)
    h = Fn.binw_conv2d_lif(x, w1, s1, 0.4, padding=1, neuron=neuron, backend="triton", batch_norm=True,
                           running_mean=bn1[0], running_var=bn1[1])
    out = Fn.binw_linear_lif(h.flatten(2), w2, s2, 0.3, neuron=neuron, backend="triton", batch_norm=True,
                             running_mean=bn2[0], running_var=bn2[1], residual=None)
    return h, out


def test_fused_layers_forward_backward_without_host_reads(no_host_reads):
    x = spikes(2, 2, 3, 5, 5, seed=1).to(torch.uint8)  # spikes by dtype
    w1, s1 = randn(4, 3, 3, 3, seed=2), randn(4, 3, 3, 3, seed=3).requires_grad_(True)
    w2, s2 = randn(6, 100, seed=4), randn(6, 100, seed=5).requires_grad_(True)
    bn1 = (torch.zeros(4), torch.ones(4))
    bn2 = (torch.zeros(6), torch.ones(6))
    h, out = _two_layers(x, w1, s1, w2, s2, bn1, bn2)
    (out * torch.arange(out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
    assert no_host_reads == []
    assert s1.grad is not None and s2.grad is not None
    # the conv output handed to the linear layer is marked (no value scan needed there)
    assert is_spikes(h) and h.dtype == torch.float32


def test_fused_layers_match_reference_with_marked_spikes():
    """The same two layers as above against the reference backend (outputs and score gradients)."""
    x = spikes(2, 2, 3, 5, 5, seed=1).to(torch.uint8)
    grads = {}
    outs = {}
    for backend in ("triton", "reference"):
        w1, s1 = randn(4, 3, 3, 3, seed=2), randn(4, 3, 3, 3, seed=3).requires_grad_(True)
        w2, s2 = randn(6, 100, seed=4), randn(6, 100, seed=5).requires_grad_(True)
        neuron = LIFConfig(decay=0.5)
        h = Fn.binw_conv2d_lif(x, w1, s1, 0.4, padding=1, neuron=neuron, backend=backend, batch_norm=True,
                               running_mean=torch.zeros(4), running_var=torch.ones(4))
        out = Fn.binw_linear_lif(h.flatten(2), w2, s2, 0.3, neuron=neuron, backend=backend, batch_norm=True,
                                 running_mean=torch.zeros(6), running_var=torch.ones(6))
        (out * torch.arange(out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        outs[backend], grads[backend] = out.detach(), (s1.grad, s2.grad)
    assert torch.equal(outs["triton"], outs["reference"])
    for got, want in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_unmarked_float_spikes_take_the_analog_path_exactly():
    """A float 0/1 tensor that no fused layer marked is analog input (no value scan): same spikes either way."""
    x = spikes(2, 2, 3, 5, 5, seed=7).clone()  # clone: the copy carries no mark
    assert not is_spikes(x)
    w, s = randn(4, 3, 3, 3, seed=8), randn(4, 3, 3, 3, seed=9)
    a = Fn.binw_conv2d_lif(x, w, s, 0.4, padding=1, backend="triton")
    b = Fn.binw_conv2d_lif(mark_spikes(x.clone()), w, s, 0.4, padding=1, backend="triton")
    assert torch.equal(a, b)


def test_float64_runs_on_the_torch_backend_in_double():
    """The float64 policy: backend='triton' with float64 x computes on the torch backend in float64."""
    from binwslt import backends
    from binwslt.kernels import ops

    assert backends.resolve_backend("triton", torch.device("cpu"), torch.float64) == "torch"
    assert backends.resolve_backend("triton", torch.device("cpu"), torch.float32) == "triton"
    x = randn(2, 2, 3, 5, 5, seed=1).double()
    w, s = randn(4, 3, 3, 3, seed=2).double(), randn(4, 3, 3, 3, seed=3).double()
    got = Fn.binw_conv2d_lif(x, w, s, 0.4, padding=1, backend="triton")
    want = Fn.binw_conv2d_lif(x, w, s, 0.4, padding=1, backend="torch")
    assert got.dtype == torch.float64 and torch.equal(got, want)
    with pytest.raises(TypeError, match="float64"):
        ops.binw_conv2d_lif(x, w, s, 0.4, stride=(1, 1), padding=(1, 1), scale=None, shift=None, residual=None,
                            neuron=LIFConfig(), timesteps=None, batch_norm=False, running_mean=None,
                            running_var=None, momentum=0.1, eps=1e-5)
