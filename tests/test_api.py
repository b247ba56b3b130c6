"""The seed API (ModelSpeedup) and the modern one (shrink -> ShrinkReport)."""

import pytest
import torch
from torch import nn

import speedup
from speedup.testing import assert_same_outputs, masked_copy
from support.checks import check_speedup, keep_mask, output_channel_masks, rows


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x, scale=None):
        h = torch.relu(self.a(x))
        return self.b(h if scale is None else h * scale)


def two_input_masks(model):
    return {"a": {"weight": rows(keep_mask(16), (16, 8))}}


@pytest.mark.parametrize("form", ["tensor", "tuple", "list", "dict"])
def test_model_speedup_accepts_every_dummy_input_form(form):
    model = TwoInputs().eval()
    masks = two_input_masks(model)
    reference = masked_copy(model, masks)
    x, scale = torch.randn(2, 8), torch.rand(2, 1)
    dummy = {"tensor": x, "tuple": (x, scale), "list": [x, scale], "dict": {"x": x, "scale": scale}}[form]
    result = speedup.ModelSpeedup(model, dummy, masks).speedup_model()
    assert result is model
    assert model.a.out_features < 16
    fresh = torch.randn(5, 8)
    assert_same_outputs(reference, model, fresh if form == "tensor" else (fresh, torch.rand(5, 1)))


def test_masks_from_a_torch_save_file_in_the_nni_layout(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    masks = output_channel_masks(model, ["0"])
    path = tmp_path / "mask.pth"
    torch.save(masks, path)
    check_speedup(model, str(path), torch.randn(2, 3, 6, 6), torch.randn(3, 3, 6, 6), shrunk=["0.weight", "2.weight"])


def test_flat_mask_layout():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    masks = {"0.weight": rows(keep_mask(16), (16, 8))}
    check_speedup(model, masks, torch.randn(2, 8), torch.randn(3, 8), shrunk=["0.weight", "2.weight"])


@pytest.mark.parametrize("by_keyword", [True, False])
def test_input_mask_given_by_argument_name_whether_passed_by_position_or_keyword(by_keyword):
    model = TwoInputs()

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(8, 8)
            self.inner = model

        def forward(self, x):
            h = self.pre(x)
            return self.inner(x=h) if by_keyword else self.inner(h)

    keep = keep_mask(8).float()
    masks = {"inner": {"_input_x": keep}, "inner.a": {"_input_input": keep}}
    check_speedup(Wrapper(), masks, torch.randn(2, 8), torch.randn(3, 8), shrunk=["pre.weight", "inner.a.weight"])


def test_report_says_what_changed_and_how_long_it_took():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    masks = output_channel_masks(model, ["0"])
    report = check_speedup(model, masks, torch.randn(2, 3, 8, 8), torch.randn(1, 3, 8, 8))
    assert set(report.modules) == {"0", "1", "3"}
    kind, shapes = report.modules["0"]
    assert kind == "Conv2d" and shapes["weight"] == ((8, 3, 3, 3), (4, 3, 3, 3))
    assert report.params_after < report.params_before
    assert 0 < report.flops_after < report.flops_before
    assert set(report.timings) >= {"trace", "propagate", "replace", "verify", "total"}
    assert report.max_abs_diff < 1e-4
    assert not report.barriers
    assert "parameters" in str(report) and "0" in report.table()


class Bessel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.special.bessel_j0(torch.relu(self.a(x))))  # no rule covers bessel_j0


def test_an_operator_no_rule_covers_is_a_reported_barrier():
    model = Bessel()
    masks = output_channel_masks(model, ["a"])
    with pytest.warns(speedup.SpeedupWarning, match="bessel_j0"):
        report = check_speedup(model, masks, torch.randn(2, 3, 5, 5), torch.randn(3, 3, 5, 5))
    assert [b.op for b in report.barriers] == ["aten.special_bessel_j0.default"]
    assert report.barriers[0].scope == ""
    assert model.a.out_channels == 8  # nothing removed across the barrier


def test_model_in_train_mode_is_traced_in_eval_mode_and_left_in_train_mode():
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 4))
    model.train()
    masks = {"0": {"weight": rows(keep_mask(16), (16, 8))}}
    with pytest.warns(speedup.SpeedupWarning, match="was in training mode: it was sped up as it computes in eval mode"):
        report = speedup.shrink(model, masks, torch.randn(2, 8))
    assert model.training and all(m.training for m in model.modules())
    assert model[0].out_features < 16
    model.eval()
    assert not any("training mode" in w for w in speedup.shrink(model, {}, torch.randn(2, 8)).warnings)
    assert sum("training mode" in w for w in report.warnings) == 1


class CachedInEval(nn.Module):
    """Caches, in eval mode, a tensor derived from its parameters and drops it when its mode is set,
    as timm's TinyViT and LeViT keep their attention biases."""

    def __init__(self, c=8):
        super().__init__()
        self.a = nn.Linear(4, c)
        self.table = nn.Parameter(torch.randn(c))
        self.b = nn.Linear(c, 3)
        self.cache = {}

    def train(self, mode=True):
        super().train(mode)
        self.cache = {}
        return self

    def forward(self, x):
        if self.training or "bias" not in self.cache:
            bias = self.table * 2
            if not self.training:
                self.cache["bias"] = bias
        else:
            bias = self.cache["bias"]
        return self.b(torch.relu(self.a(x) + bias))


@pytest.mark.parametrize("verify", [True, False])
def test_a_tensor_cached_from_full_size_parameters_is_dropped(verify):
    model = CachedInEval().eval()
    model(torch.randn(2, 4))  # the user ran it: the cache is full
    masks = output_channel_masks(model, ["a"])
    check_speedup(model, masks, torch.randn(2, 4), torch.randn(5, 4), shrunk=["a.weight", "table", "b.weight"],
                  verify=verify)


def folding_network() -> nn.Module:
    """Removed channels carry a BatchNorm shift through a ReLU into the next convolution (folded)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].bias.uniform_(-1, 1)
    return model


FOLDING_MASKS = {"0": {"weight": rows(torch.arange(8) % 2 == 0, (8, 3, 3, 3))}}


CALLER_CONTEXTS = {
    "inference_mode": torch.inference_mode,
    "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
}


@pytest.mark.parametrize("context", CALLER_CONTEXTS.values(), ids=CALLER_CONTEXTS.keys())
def test_the_call_runs_in_ordinary_mode_whatever_the_callers(context):
    """Under torch.inference_mode tensors track no versions (the trace failed) and new parameters
    could never be trained; under autocast the folded constants were rounded to bfloat16 (1e-3 off)."""
    model = folding_network()
    reference = masked_copy(model, FOLDING_MASKS)
    with context():
        speedup.shrink(model, FOLDING_MASKS, torch.randn(1, 3, 8, 8))
    assert_same_outputs(reference, model, torch.randn(2, 3, 9, 7))
    assert model[0].weight.shape[0] == 4
    assert all(not p.is_inference() and p.requires_grad for p in model.parameters())


class HalfPrecisionInside(nn.Module):
    """Runs its middle layer under ``torch.autocast`` in bfloat16, its outputs in float32."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = torch.relu(self.fc2(x))
        return self.head(x.float())


def test_a_model_computing_in_half_precision_inside_is_verified_within_its_round_off():
    """The constants of fc1's masked rows are folded into fc2's bias, which adds them in bfloat16: the
    float32 outputs differ by bfloat16's round-off, and the float32 tolerance refused ("please report")."""
    from speedup.engine import closeness

    torch.manual_seed(0)
    model = HalfPrecisionInside().eval()
    masks = {"fc1": {"weight": rows(torch.arange(32) % 2 == 1, (32, 16))}}
    reference = masked_copy(model, masks)
    speedup.shrink(model, masks, torch.randn(2, 16))
    fresh = torch.randn(64, 16)
    with torch.no_grad():
        assert closeness(reference(fresh), model(fresh), reduced=True)[0]
    assert model.fc1.out_features == 16 and model.fc2.in_features == 16


def test_a_dummy_input_made_in_inference_mode_is_accepted():
    with torch.inference_mode():
        dummy = torch.randn(1, 3, 8, 8)
    check_speedup(folding_network(), FOLDING_MASKS, dummy, torch.randn(2, 3, 9, 7), shrunk=["0.weight"])


def test_a_model_made_in_inference_mode_is_shrunk():
    """A model built or loaded under torch.inference_mode holds inference tensors, which track no
    versions: reading one's version raised, and the call blamed the dummy input."""
    with torch.inference_mode():
        model = folding_network()
    reference = masked_copy(model, FOLDING_MASKS)
    check_speedup(model, FOLDING_MASKS, torch.randn(1, 3, 8, 8), torch.randn(2, 3, 9, 7), shrunk=["0.weight"])
    fresh = torch.randn(2, 3, 9, 7)
    with torch.inference_mode():
        assert_same_outputs(reference, model, fresh)


class InferenceModeForward(nn.Module):
    """A forward decorated with torch.inference_mode, writing its activations in place (through a view too)."""

    def __init__(self):
        super().__init__()
        self.body = folding_network()

    @torch.inference_mode()
    def forward(self, x):
        y = self.body(x).relu_()
        y[:, :2].mul_(2)
        return y


def test_a_forward_running_in_inference_mode_is_shrunk():
    masks = {"body." + name: entry for name, entry in FOLDING_MASKS.items()}
    check_speedup(InferenceModeForward(), masks, torch.randn(1, 3, 8, 8), torch.randn(2, 3, 9, 7),
                  shrunk=["body.0.weight"])


class SamplingAutoencoder(nn.Module):
    """A variational autoencoder: it samples its latent in ``forward``, in eval mode too."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, 3, padding=1)
        self.mean, self.log_variance = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.decoder = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.encoder(x))
        mean, log_variance = self.mean(hidden), self.log_variance(hidden)
        return self.decoder(mean + torch.randn_like(mean) * torch.exp(0.5 * log_variance))


def test_a_model_drawing_random_numbers_is_verified_on_the_same_draws_and_leaves_the_generator_as_it_was():
    torch.manual_seed(0)
    model = SamplingAutoencoder().eval()
    masks = output_channel_masks(model, ["encoder"])
    reference = masked_copy(model, masks).eval()
    dummy = torch.randn(2, 3, 6, 6)
    state = torch.get_rng_state()
    speedup.shrink(model, masks, dummy)
    assert torch.equal(torch.get_rng_state(), state)  # the call drew nothing the next forward would miss
    assert model.encoder.out_channels == 4 and model.mean.in_channels == 4
    fresh = torch.randn(3, 3, 7, 5)
    torch.manual_seed(1)
    expected = reference(fresh)
    torch.manual_seed(1)
    torch.testing.assert_close(model(fresh), expected)
