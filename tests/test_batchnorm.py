"""binwslt.batchnorm (the one BatchNorm module of every backend) against torch's own batch_norm, in float64."""
import pytest
import torch
import torch.nn.functional as F

from binwslt import batchnorm


def _case(affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(-9, 10, (3, 5, 4, 2, 3), generator=g).to(torch.float64)  # [T, N, C, H, W]: integer y
    alpha = torch.tensor(0.37, dtype=torch.float64)
    scale = torch.rand(4, generator=g, dtype=torch.float64) + 0.5 if affine else None
    shift = torch.randn(4, generator=g, dtype=torch.float64) if affine else None
    grad = torch.randn(y.shape, generator=g, dtype=torch.float64)  # dL/dI
    return y, alpha, scale, shift, grad


@pytest.mark.parametrize("affine", [True, False])
def test_forward_and_backward_match_torch_batch_norm(affine):
    y, alpha, scale, shift, grad = _case(affine)
    frames = y.flatten(0, 1)  # [T*N, C, H, W]
    count = frames.numel() // frames.shape[1]
    # forward: statistics from sums (the kernels' path) and from values (the torch backend's path) agree
    dims = [0, 2, 3]
    mean_s, var_s = batchnorm.stats_from_sums(frames.sum(dims), (frames * frames).sum(dims), count, alpha)
    mean_v, var_v = batchnorm.stats_from_values(frames, alpha, 1)
    torch.testing.assert_close(mean_s, mean_v.float())
    torch.testing.assert_close(var_s, var_v.float())
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    bn = batchnorm.train_rstd(mean_v, var_v, count, rm, rv, 0.1, 1e-5)
    gain, bias = batchnorm.current_affine(scale, shift, bn)
    current = frames * alpha * gain.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)

    x = (frames * alpha).requires_grad_(True)
    w = scale.clone().requires_grad_(True) if affine else None
    b = shift.clone().requires_grad_(True) if affine else None
    rm_ref, rv_ref = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    ref = F.batch_norm(x, rm_ref, rv_ref, w, b, training=True, momentum=0.1, eps=1e-5)
    torch.testing.assert_close(current, ref.detach())
    torch.testing.assert_close(rm, rm_ref)
    torch.testing.assert_close(rv, rv_ref)

    # backward: the coefficients from two reductions equal autograd through torch's batch_norm
    g = grad.flatten(0, 1)
    ref.backward(g)
    coeffs = batchnorm.backward_coefficients(alpha, scale, bn, g.sum(dims), (g * frames).sum(dims), count)
    grad_ay = (coeffs.c1.view(1, -1, 1, 1) * g + coeffs.c2.view(1, -1, 1, 1) * frames
               + coeffs.c3.view(1, -1, 1, 1))
    torch.testing.assert_close(grad_ay, x.grad)
    if affine:
        torch.testing.assert_close(coeffs.grad_scale, w.grad)
        torch.testing.assert_close(coeffs.grad_shift, b.grad)


def test_without_batch_norm_and_eval_fold():
    y, alpha, scale, shift, grad = _case(True, seed=1)
    frames, g = y.flatten(0, 1), grad.flatten(0, 1)
    dims = [0, 2, 3]
    assert batchnorm.current_affine(scale, shift, None) == (scale, shift)
    assert batchnorm.grad_multiplier(scale, None) is scale
    coeffs = batchnorm.backward_coefficients(alpha, scale, None, g.sum(dims), (g * frames).sum(dims), 7)
    assert coeffs.c1 is None
    s = scale.clone().requires_grad_(True)
    t = shift.clone().requires_grad_(True)
    ((frames * alpha * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)) * g).sum().backward()
    torch.testing.assert_close(coeffs.grad_scale, s.grad)
    torch.testing.assert_close(coeffs.grad_shift, t.grad)
    # eval mode: the folded (scale, shift) reproduce F.batch_norm with the running statistics
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.1
    fs, ft = batchnorm.eval_affine(rm, rv, 1e-5, scale, shift)
    ref = F.batch_norm(frames, rm, rv, scale, shift, training=False, eps=1e-5)
    torch.testing.assert_close(frames * fs.view(1, -1, 1, 1) + ft.view(1, -1, 1, 1), ref)
