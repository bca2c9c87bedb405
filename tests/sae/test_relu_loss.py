"""The hand-written relu loss against autograd on the plain formula (float64)."""

import pytest
import torch

from featopt.models.sae.relu_loss import relu_loss


def _weights(d_in=6, d_sae=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
            for shape in ((d_in, d_sae), (d_sae,), (d_sae, d_in), (d_in,))]


def _plain(x, W_enc, b_enc, W_dec, b_dec, total_var, l1):
    z = torch.relu((x - b_dec) @ W_enc + b_enc)
    x_hat = z @ W_dec + b_dec
    sq = (x_hat - x).pow(2).sum()
    return (sq + l1 * (z * W_dec.norm(dim=1)).sum()) / total_var, sq, z


@pytest.mark.parametrize("l1", [0.0, 0.7])
def test_loss_statistics_and_every_gradient_match_autograd(l1):
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    total_var = torch.tensor(3.5, dtype=torch.float64)
    ours, ref = _weights(), _weights()
    loss, sq, l0, fired = relu_loss(x, *ours, total_var, l1)
    want, want_sq, z = _plain(x, *ref, total_var, l1)
    assert 0 < int(l0) < z.numel()  # the mask matters in this case
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(sq, want_sq.detach())
    assert int(l0) == int((z > 0).sum())
    assert torch.equal(fired, (z > 0).any(0))
    (2.5 * loss).backward()
    (2.5 * want).backward()
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec"), ours, ref):
        torch.testing.assert_close(a.grad, b.grad, msg=f"gradient of {name}")


def test_frozen_weights_get_no_gradient():
    x = torch.randn(4, 6, dtype=torch.float64)
    W_enc, b_enc, W_dec, b_dec = _weights()
    W_enc.requires_grad_(False)
    loss = relu_loss(x, W_enc, b_enc, W_dec, b_dec, torch.tensor(1.0, dtype=torch.float64), 0.5)[0]
    loss.backward()
    assert W_enc.grad is None and b_enc.grad is not None


def test_under_bf16_autocast_gradients_come_back_float32_and_close():
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(2))
    total_var = torch.tensor(50.0)
    ours, ref = _weights(dtype=torch.float32), _weights(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = relu_loss(x, *ours, total_var, 0.3)[0]
    loss.backward()
    _plain(x, *ref, total_var, 0.3)[0].backward()
    for a, b in zip(ours, ref):
        assert a.grad.dtype == torch.float32
        assert (a.grad - b.grad).norm() <= 0.05 * b.grad.norm()
