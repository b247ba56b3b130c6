"""Fourier transforms and complex numbers: channels pass through a long convolution computed by FFT
(S4, Hyena, H3) and a complex diagonal recurrence (LRU)."""

import pytest
import torch
from torch import nn

from support.checks import check_speedup, keep_mask, rows


class LongConvolution(nn.Module):
    """``irfft(rfft(u) * rfft(k))`` along time, a filter per channel (S4D's convolution mode)."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(16, 32), nn.Linear(32, 4)
        self.kernel = nn.Parameter(torch.randn(32, 12))

    def forward(self, x):
        u = self.enc(x).transpose(1, 2)
        length = u.shape[-1]
        spectrum = torch.fft.rfft(u, n=2 * length) * torch.fft.rfft(self.kernel[:, :length], n=2 * length)
        y = torch.fft.irfft(spectrum, n=2 * length)[..., :length]
        return self.dec(y.transpose(1, 2) + u.transpose(1, 2))


@pytest.mark.parametrize("verify", [True, False])
def test_channels_of_a_long_convolution_by_fft_go(verify):
    """The transforms run along time only; they were barriers, keeping every channel."""
    torch.manual_seed(0)
    model = LongConvolution().eval()
    kept = keep_mask(32)
    masks = {"enc": {"weight": rows(kept, (32, 16)), "bias": kept}}
    report = check_speedup(model, masks, torch.randn(2, 8, 16), torch.randn(3, 11, 16),
                           shrunk=["enc.weight", "kernel", "dec.weight"], verify=verify)
    assert model.kernel.shape == (16, 12) and not report.barriers


class ComplexDiagonal(nn.Module):
    """LRU's recurrence: a complex eigenvalue per channel made with ``torch.complex``, its real part read."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(16, 32), nn.Linear(32, 4)
        self.nu, self.theta = nn.Parameter(torch.rand(32) * 0.9), nn.Parameter(torch.rand(32))

    def forward(self, x):
        u = self.enc(x)
        lam = torch.complex(self.nu, self.theta)
        h = torch.zeros_like(u[:, 0], dtype=torch.cfloat)
        states = []
        for t in range(u.shape[1]):
            h = lam * h + u[:, t]
            states.append(h.real)
        return self.dec(torch.stack(states, 1))


def test_channels_of_a_complex_recurrence_go():
    """``torch.complex`` was a barrier."""
    torch.manual_seed(0)
    model = ComplexDiagonal().eval()
    kept = keep_mask(32)
    masks = {"enc": {"weight": rows(kept, (32, 16)), "bias": kept}}
    report = check_speedup(model, masks, torch.randn(2, 5, 16), torch.randn(3, 7, 16), shrunk=["enc.weight", "nu"])
    assert model.theta.shape == (16,) and not report.barriers
