"""Models prepared for quantization-aware training (``torch.ao``): fake quantization of activations and
weights, per tensor and per channel, against the masked model."""

import pytest
import torch
import torch.ao.nn.qat as nnqat
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn

import speedup
from speedup.testing import assert_same_outputs, masked_copy
from support.checks import check_speedup, rows

C = 16
KEEP = torch.arange(C) % 2 == 0
QCONFIG = tq.get_default_qat_qconfig("x86")  # fused moving-average observers: per channel for weights

ACTIVATION_QUANTIZERS = {
    "per tensor": tq.FakeQuantize,
    "per channel": lambda: tq.FakeQuantize(observer=tq.MovingAveragePerChannelMinMaxObserver, ch_axis=1,
                                           quant_min=-128, quant_max=127, dtype=torch.qint8,
                                           qscheme=torch.per_channel_symmetric),
    "fused, per tensor": QCONFIG.activation,
}


class QuantizedStack(nn.Module):
    """conv, BatchNorm, ReLU, fake-quantized activations, a conv, then a QAT conv (its weights
    fake-quantized per channel) and a head."""

    def __init__(self, quantizer):
        super().__init__()
        self.conv1, self.bn, self.quantize = nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), quantizer()
        self.conv2 = nn.Conv2d(C, C, 3, padding=1)
        self.conv3 = nnqat.Conv2d(C, C, 3, padding=1, qconfig=QCONFIG)
        self.head = nn.Linear(C, 5)

    def forward(self, x):
        x = self.conv2(self.quantize(F.relu(self.bn(self.conv1(x)))))
        return self.head(F.relu(self.conv3(F.relu(x))).mean((2, 3)))


def calibrated(quantizer, observing: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = QuantizedStack(quantizer)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.bias.uniform_(-1, 1)
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8))
    if not observing:
        model.apply(tq.disable_observer)
    return model.eval()


@pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max")
@pytest.mark.parametrize("quantizer", ACTIVATION_QUANTIZERS.values(), ids=ACTIVATION_QUANTIZERS.keys())
def test_fake_quantized_channels_go_and_their_constants_are_folded(quantizer):
    """The fake-quantizing operators were barriers: nothing was removed. Masked channels holding the
    BatchNorm's shift are quantized constants, folded into the next conv; the QAT conv's weights are
    fake-quantized per output channel."""
    model = calibrated(quantizer)
    masks = {"conv1": {"weight": rows(KEEP, (C, 3, 3, 3))}, "conv3": {"weight": rows(KEEP, (C, C, 3, 3)), "bias": KEEP}}
    report = check_speedup(model, masks, torch.randn(2, 3, 8, 8), torch.randn(3, 3, 9, 9),
                           shrunk=["conv1.weight", "conv2.weight", "conv3.weight", "head.weight"])
    assert not report.barriers and not report.masked_but_kept
    weights = model.conv3.weight_fake_quant  # its per-channel scale and statistics follow the channels
    assert weights.scale.shape == weights.activation_post_process.min_val.shape == (C // 2,)
    observer = model.quantize.activation_post_process  # read only while on: they follow the scale
    assert observer.min_val.numel() == model.quantize.scale.numel()
    model.apply(tq.enable_observer).train()
    model(torch.randn(2, 3, 8, 8)).sum().backward()  # quantization-aware training goes on


class QuantStubbed(nn.Module):
    """What ``torch.ao.quantization.convert`` turns into a quantized model: stubs around convolutions."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1, self.relu, self.conv2 = nn.Conv2d(3, C, 3), nn.ReLU(), nn.Conv2d(C, 8, 3)

    def forward(self, x):
        return self.dequant(self.conv2(self.relu(self.conv1(self.quant(x)))))


@pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max", "ignore:torch.ao.quantization is deprecated",
                            "ignore:torch.quantize_per_tensor")
def test_a_sped_up_model_converts_to_the_masked_models_quantized_model():
    """With fbgemm's version-0 configuration the weights' observers are not fused: their per-channel
    statistics, never read while off, kept their 16 channels, and convert raised ("length of scales
    must equal to channel")."""
    torch.manual_seed(0)
    model = QuantStubbed().train()
    model.qconfig = tq.get_default_qat_qconfig("fbgemm", version=0)
    tq.prepare_qat(model, inplace=True)
    for _ in range(3):
        model(torch.randn(4, 3, 10, 10))
    model.apply(tq.disable_observer).eval()
    masks = {"conv1": {"weight": rows(KEEP, (C, 3, 3, 3)), "bias": KEEP}}
    reference = tq.convert(masked_copy(model, masks).eval())
    check_speedup(model, masks, torch.randn(2, 3, 10, 10), torch.randn(3, 3, 12, 12), shrunk=["conv1.weight"])
    x = torch.randn(3, 3, 12, 12)
    assert_same_outputs(reference, tq.convert(model.eval()), x)


@pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max")
def test_a_model_whose_observers_are_on_is_told_to_turn_them_off():
    """Observers change the model's statistics each time it runs: the call ended in a bare "please
    report" VerificationError."""
    model = calibrated(ACTIVATION_QUANTIZERS["fused, per tensor"], observing=True)
    masks = {"conv1": {"weight": rows(KEEP, (C, 3, 3, 3)), "bias": KEEP}}
    with pytest.raises(speedup.VerificationError, match="disable_observer"):
        speedup.shrink(model, masks, torch.randn(2, 3, 8, 8))
