"""Bad input: every mistake raises a clear error and leaves the model exactly as it was.

Each failing call is checked twice: the exception (its type, and a message that names the module
or parameter and says what to do), and the model (``assert_unchanged``: values, parameter objects,
module tree, train/eval flags, hooks). Odd but valid input (a layer masked away entirely, masks
loaded with ``map_location``) must work and give the masked model's outputs.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import speedup
from speedup.testing import assert_same_outputs, masked_copy
from support.checks import assert_unchanged, check_speedup, keep_mask, output_channel_masks, rows, state_and_structure


class SmallNet(nn.Module):
    """conv1 -> bn1 -> relu -> conv2 -> relu -> global mean -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def small_net():
    model = SmallNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a wrong rollback would show
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 1.5)
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.5, 0.5)
    return model.eval()


def dummy():
    return torch.randn(2, 3, 8, 8)


def fresh():
    return torch.randn(3, 3, 7, 9)


def good_masks(model):
    """Valid masks removing half of conv1's output channels."""
    return output_channel_masks(model, ["conv1"])


def expect_failure(model, masks, error, *, inputs=None, **options):
    """Runs ``shrink``, expecting ``error``; asserts the model is unchanged; returns the message."""
    snapshot = state_and_structure(model)
    with pytest.raises(error) as caught:
        speedup.shrink(model, masks, dummy() if inputs is None else inputs, **options)
    assert_unchanged(model, snapshot)
    return str(caught.value)


# -- masks naming what the model does not have ------------------------------------------------


def test_mask_for_missing_module_raises_mask_error_suggesting_close_names():
    model = small_net()
    masks = {"conv_1": {"weight": torch.ones(8, 3, 3, 3)}}
    message = expect_failure(model, masks, speedup.MaskError)
    assert "'conv_1'" in message
    assert "'conv1'" in message  # the close name is suggested
    assert "named_modules" in message  # says what mask keys must be


def test_flat_mask_for_missing_module_raises_mask_error_suggesting_close_names():
    model = small_net()
    message = expect_failure(model, {"conv3.weight": torch.ones(8, 3, 3, 3)}, speedup.MaskError)
    assert "'conv3'" in message
    assert "'conv1'" in message or "'conv2'" in message


def test_mask_for_missing_parameter_raises_mask_error_listing_the_module_parameters():
    model = small_net()
    masks = {"conv1": {"wieght": torch.ones(8, 3, 3, 3)}}
    message = expect_failure(model, masks, speedup.MaskError)
    assert "'wieght'" in message
    assert "conv1" in message and "Conv2d" in message
    assert "weight" in message.split("it has:")[1]  # lists what the module does have
    assert "_input_0" in message  # and how inputs/outputs are masked instead


def test_valid_mask_followed_by_a_bad_one_changes_nothing():
    # Masks are all checked before any is applied.
    model = small_net()
    masks = good_masks(model)
    masks["fc"] = {"weight": torch.ones(4, 6), "scale": torch.ones(4)}
    message = expect_failure(model, masks, speedup.MaskError)
    assert "'scale'" in message and "fc" in message


@pytest.mark.filterwarnings("ignore")  # torch deprecates its eager-mode quantization
def test_a_mask_for_a_quantized_layer_says_to_speed_up_the_float_model_first():
    """A dynamically quantized Linear holds its weight packed: it has no parameter to mask."""
    model = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval(),
                                                   {nn.Linear}, dtype=torch.qint8)
    keep = torch.tensor([True, False] * 4)
    before = repr(model)  # its state dict holds packed weights and dtypes, which the usual snapshot cannot copy
    with pytest.raises(speedup.MaskError, match="'0'.*quantized: speed up the float model, then quantize it"):
        speedup.shrink(model, {"0": {"weight": keep[:, None].expand(8, 8)}}, torch.randn(2, 8))
    assert repr(model) == before


# -- masks of the wrong shape or values -------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(16, 3, 3, 3), (8, 3, 3), (8,), (1, 8, 3, 3, 3)],
    ids=["too-many-channels", "missing-dim", "channel-vector", "extra-dim"],
)
def test_mask_of_wrong_shape_raises_mask_error_with_both_shapes(shape):
    model = small_net()
    message = expect_failure(model, {"conv1": {"weight": torch.ones(shape)}}, speedup.MaskError)
    assert "conv1.weight" in message
    assert str(tuple(shape)) in message and "(8, 3, 3, 3)" in message
    assert "parameter's shape" in message  # says what shape is expected
    assert ("(8, 1, 1, 1)" in message) == (shape == (8,))  # a vector per output channel: the shape that would do


def test_bias_mask_of_wrong_shape_raises_mask_error():
    model = small_net()
    masks = good_masks(model)
    masks["conv1"]["bias"] = torch.ones(7, dtype=torch.bool)
    message = expect_failure(model, masks, speedup.MaskError)
    assert "conv1.bias" in message and "(7,)" in message and "(8,)" in message


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0], ids=["half", "two", "minus-one"])
def test_mask_with_values_other_than_0_and_1_raises_mask_error(bad):
    model = small_net()
    mask = torch.ones(8, 3, 3, 3)
    mask[3] = bad
    message = expect_failure(model, {"conv1": {"weight": mask}}, speedup.MaskError)
    assert "'weight'" in message and "'conv1'" in message
    assert "other than 0 and 1" in message
    assert str(bad) in message  # shows an offending value
    assert "threshold" in message  # says what to do


def test_a_mask_on_the_meta_device_raises_mask_error_saying_where_to_load_it():
    model = small_net()
    mask = torch.ones(8, 3, 3, 3, device="meta")
    message = expect_failure(model, {"conv1": {"weight": mask}}, speedup.MaskError)
    assert "'conv1'" in message and "meta device" in message and "map_location" in message


def test_nan_mask_raises_mask_error():
    model = small_net()
    mask = torch.ones(8)
    mask[2] = math.nan
    message = expect_failure(model, {"conv1": {"bias": mask}}, speedup.MaskError)
    assert "'bias'" in message and "'conv1'" in message
    assert "nan" in message.lower()


def test_nan_mask_is_not_mistaken_for_kept_entries_in_a_flat_mask():
    # bool(nan) is True: a NaN must not silently become "kept".
    model = small_net()
    mask = rows(keep_mask(8), (8, 3, 3, 3)).float()
    mask[0, 0, 0, 0] = math.nan
    message = expect_failure(model, {"conv1.weight": mask}, speedup.MaskError)
    assert re.search(r"nan", message, re.IGNORECASE)


def test_integer_mask_with_a_2_raises_mask_error():
    model = small_net()
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 0] = 2
    message = expect_failure(model, {"fc.weight": mask}, speedup.MaskError)
    assert "'weight'" in message and "'fc'" in message


# -- masks that are not masks -----------------------------------------------------------------


@pytest.mark.parametrize(
    "masks",
    [[("conv1", {"weight": torch.ones(8, 3, 3, 3)})], torch.ones(8), None, 42],
    ids=["list", "tensor", "none", "int"],
)
def test_masks_that_are_not_a_dict_raise_mask_error(masks):
    model = small_net()
    message = expect_failure(model, masks, speedup.MaskError)
    assert "must be a dict" in message
    assert "torch.save" in message


def test_masks_entry_that_is_not_a_dict_raises_mask_error_naming_it():
    model = small_net()
    message = expect_failure(model, {"conv1": [1, 0, 1]}, speedup.MaskError)
    assert "masks['conv1']" in message and "list" in message


def test_mask_that_is_not_a_tensor_raises_mask_error():
    model = small_net()
    message = expect_failure(model, {"conv1": {"bias": "all"}}, speedup.MaskError)
    assert "'bias'" in message and "'conv1'" in message and "str" in message


def test_mask_path_that_does_not_exist_raises_mask_error(tmp_path):
    model = small_net()
    path = tmp_path / "no_such_masks.pth"
    message = expect_failure(model, str(path), speedup.MaskError)
    assert str(path) in message and "does not exist" in message


def test_mask_path_as_pathlike_that_does_not_exist_raises_mask_error(tmp_path):
    model = small_net()
    path = tmp_path / "missing" / "masks.pth"
    message = expect_failure(model, path, speedup.MaskError)
    assert "does not exist" in message


def test_corrupt_mask_file_raises_mask_error(tmp_path):
    model = small_net()
    path = tmp_path / "masks.pth"
    path.write_bytes(b"this is not a torch.save file\x00\x01\x02")
    message = expect_failure(model, str(path), speedup.MaskError)
    assert str(path) in message and "torch.save" in message


def test_truncated_mask_file_raises_mask_error(tmp_path):
    model = small_net()
    path = tmp_path / "masks.pth"
    torch.save(good_masks(model), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = expect_failure(model, str(path), speedup.MaskError)
    assert str(path) in message


def test_mask_file_holding_a_list_raises_mask_error(tmp_path):
    model = small_net()
    path = tmp_path / "masks.pth"
    torch.save([torch.ones(8)], path)
    message = expect_failure(model, str(path), speedup.MaskError)
    assert "must be a dict" in message and "list" in message


# -- failures after the masks were applied: these test the rollback ---------------------------


def test_dummy_input_the_model_rejects_raises_trace_error_and_rolls_back():
    model = small_net()
    masks = good_masks(model)
    bad_input = torch.randn(2, 5, 8, 8)  # 5 channels where conv1 takes 3
    message = expect_failure(model, masks, speedup.TraceError, inputs=bad_input)
    assert "(2, 5, 8, 8)" in message  # the shapes it was given
    assert "dummy_input" in message  # and what to pass instead
    assert "unchanged" in message


class NormalisedFeatures(nn.Module):
    """Features divided by their norm, as an image tower's embedding (ALIGN's): with weights tiny enough
    the norm underflows to 0 and the masked model returns infinities and NaN."""

    def __init__(self, scale: float):
        super().__init__()
        self.fc = nn.Linear(8, 16, bias=False)
        with torch.no_grad():
            self.fc.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y / y.norm(dim=-1, keepdim=True)


def test_a_masked_model_returning_infinities_on_the_dummy_is_said_to_be_the_cause():
    masks = {"fc": {"weight": rows(keep_mask(16), (16, 8))}}
    model = NormalisedFeatures(1e-25)
    message = expect_failure(model, masks, speedup.VerificationError, inputs=torch.randn(2, 8))
    assert "infinities or NaN on the dummy input (output 0)" in message and "please report" not in message.lower()
    check_speedup(NormalisedFeatures(1.0), masks, torch.randn(2, 8), torch.randn(3, 8), shrunk=["fc.weight"])


def test_dummy_input_with_wrong_arguments_raises_trace_error():
    model = small_net()
    message = expect_failure(model, good_masks(model), speedup.TraceError, inputs={"y": torch.randn(2, 3, 8, 8)})
    assert "TypeError" in message and "dummy_input" in message


def test_a_rule_failing_on_inputs_the_module_takes_raises_rule_error_naming_both(monkeypatch):
    """A masked convolution's input the convolution rejects is the dummy input's fault (above); one it
    takes but the rule's masked forward fails on is the rule's: said so, and the model is unchanged."""
    from speedup.rules import conv

    def broken(self, x):
        raise RuntimeError("an index out of range")

    monkeypatch.setattr(conv.KeptChannelsConv, "__call__", broken)
    model = small_net()
    message = expect_failure(model, good_masks(model), speedup.RuleError)
    assert "'conv1' (Conv2d)" in message and "speedup.rules.conv" in message and "an index out of range" in message
    assert "report" in message and "unchanged" in message
    assert "forward" not in model.conv1.__dict__


def test_model_rejecting_dummy_input_keeps_speedup_usable_afterwards():
    model = small_net()
    masks = good_masks(model)
    with pytest.raises(speedup.TraceError):
        speedup.shrink(model, masks, torch.randn(2, 5, 8, 8))
    check_speedup(model, masks, dummy(), fresh(), shrunk=["conv1.weight", "conv2.weight"])


def test_output_mask_that_does_not_broadcast_raises_error_naming_the_module():
    model = small_net()
    masks = good_masks(model)
    masks["conv2"] = {"_output_0": torch.ones(5, dtype=torch.bool)}  # conv2's output is (2, 6, 8, 8)
    message = expect_failure(model, masks, speedup.MaskError)
    assert "'conv2'" in message and "'_output_0'" in message
    assert "(5,)" in message and "(2, 6, 8, 8)" in message


def test_output_mask_on_the_channel_dimension_of_wrong_size_raises_error():
    model = small_net()
    masks = good_masks(model)  # applied before the model is run: the rollback must undo them
    masks["conv1"]["_output_0"] = torch.ones(1, 5, 1, 1)
    message = expect_failure(model, masks, speedup.MaskError)
    assert "'conv1'" in message and "(1, 5, 1, 1)" in message and "(2, 8, 8, 8)" in message


def test_output_mask_that_would_enlarge_the_output_raises_error():
    # (1, 1, 4) broadcasts *with* fc's (2, 4) output, but not *to* it: tensor * mask would be (1, 2, 4).
    model = small_net()
    masks = {"fc": {"_output_0": torch.tensor([[[1.0, 0.0, 1.0, 1.0]]])}}
    message = expect_failure(model, masks, speedup.MaskError)
    assert "'fc'" in message and "(1, 1, 4)" in message


def test_input_mask_that_does_not_broadcast_raises_error_naming_the_module():
    model = small_net()
    masks = {"fc": {"_input_0": torch.ones(1, 5)}}  # fc's input is (2, 6)
    message = expect_failure(model, masks, speedup.MaskError)
    assert "'fc'" in message and "'_input_0'" in message
    assert "(1, 5)" in message and "(2, 6)" in message


def test_output_mask_for_an_output_the_module_does_not_have_raises_error():
    model = small_net()
    masks = {"conv2": {"_output_1": torch.ones(1, 6, 1, 1)}}
    message = expect_failure(model, masks, speedup.MaskError)
    assert "'conv2'" in message and "_output_1" in message


class Boom(RuntimeError):
    pass


def test_customized_replace_func_that_raises_propagates_and_rolls_back():
    model = small_net()
    calls = []

    def replace_conv(module, masks):
        calls.append(module)
        if len(calls) == 2:  # the first replacement is already in the model by now
            raise Boom("cannot replace this conv")
        return nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, padding=module.padding)

    masks = good_masks(model)
    snapshot = state_and_structure(model)
    with pytest.raises(Boom, match="cannot replace this conv"):
        speedup.shrink(model, masks, dummy(), customized_replace_func={nn.Conv2d: replace_conv})
    assert len(calls) == 2
    assert_unchanged(model, snapshot)


def test_customized_replace_func_given_by_class_name_that_raises_rolls_back():
    model = small_net()

    def refuse(module, masks):
        raise Boom("no")

    masks = good_masks(model)
    snapshot = state_and_structure(model)
    with pytest.raises(Boom):
        speedup.shrink(model, masks, dummy(), customized_replace_func={"Linear": refuse, "Conv2d": refuse})
    assert_unchanged(model, snapshot)


def test_failed_speedup_through_model_speedup_leaves_model_unchanged():
    model = small_net()
    snapshot = state_and_structure(model)
    runner = speedup.ModelSpeedup(model, torch.randn(2, 5, 8, 8), good_masks(model))
    with pytest.raises(speedup.TraceError):
        runner.speedup_model()
    assert runner.report is None
    assert_unchanged(model, snapshot)


def test_a_model_writing_its_own_weights_in_place_is_restored_when_speedup_fails(monkeypatch):
    """An embedding bag with ``max_norm`` renormalises the rows it looks up, in place, on every call:
    the recording and the verification run it, and a failure must undo what they wrote (the rows the
    dummy looked up stayed renormalised)."""
    import speedup.engine as engine

    monkeypatch.setattr(engine, "_verify", lambda *args, **options: engine._Check(False, None, "outputs differ"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(30, 16, mode="mean", max_norm=1.0), nn.Linear(16, 4))
    kept_rows = torch.arange(30) % 2 == 1
    masks = {"0": {"weight": rows(kept_rows, (30, 16))}}
    expect_failure(model, masks, speedup.SpeedupError, inputs=torch.arange(16).view(2, 8))


# -- train/eval flags ----------------------------------------------------------------------------


def test_failed_speedup_of_a_model_in_train_mode_restores_train_flags():
    model = small_net().train()
    model.bn1.eval()  # mixed flags must come back exactly
    snapshot = state_and_structure(model)
    with pytest.raises(speedup.TraceError):
        speedup.shrink(model, good_masks(model), torch.randn(2, 5, 8, 8))
    assert_unchanged(model, snapshot)
    assert model.training and model.conv1.training and not model.bn1.training


def test_failed_replacement_of_a_model_in_train_mode_restores_train_flags():
    model = small_net().train()
    snapshot = state_and_structure(model)

    def refuse(module, masks):
        raise Boom("no")

    with pytest.raises(Boom):
        speedup.shrink(model, good_masks(model), dummy(), customized_replace_func={nn.Conv2d: refuse})
    assert_unchanged(model, snapshot)
    assert all(m.training for m in model.modules())


def test_successful_speedup_of_a_model_in_train_mode_leaves_it_in_train_mode():
    model = small_net()
    masks = good_masks(model)
    reference = masked_copy(model, masks).eval()
    model.train()
    speedup.shrink(model, masks, dummy())
    assert model.conv1.weight.shape[0] == 4  # it did shrink
    assert all(m.training for _, m in model.named_modules()), [n for n, m in model.named_modules() if not m.training]
    model.eval()
    assert_same_outputs(reference, model, fresh())


def test_successful_speedup_keeps_mixed_train_eval_flags_per_module():
    model = small_net().train()
    model.bn1.eval()
    speedup.shrink(model, good_masks(model), dummy())
    assert model.bn1.num_features == 4  # bn1 was rebuilt, and kept its eval flag
    assert {n: m.training for n, m in model.named_modules()} == {
        "": True, "conv1": True, "bn1": False, "conv2": True, "fc": True,
    }


# -- odd but valid input -----------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False], ids=["weight-and-bias", "weight-only"])
def test_mask_removing_every_output_channel_of_a_used_conv_warns_and_keeps_a_valid_model(with_bias):
    model = small_net()
    masks = {"conv1": {"weight": torch.zeros(8, 3, 3, 3)}}
    if with_bias:
        masks["conv1"]["bias"] = torch.zeros(8)
    with pytest.warns(speedup.SpeedupWarning) as record:
        report = check_speedup(model, masks, dummy(), fresh())
    messages = [str(w.message) for w in record if issubclass(w.category, speedup.SpeedupWarning)]
    assert any("every entry" in m and "one entry is kept" in m for m in messages), messages
    assert any(m in " ".join(report.warnings) for m in messages)
    assert model.conv1.out_channels >= 1 and model.conv1.weight.shape[0] == model.conv1.out_channels
    model(fresh())  # still runs at another batch size and resolution


def test_mask_removing_every_output_channel_of_the_last_conv_warns_and_stays_valid():
    model = small_net()
    masks = {"conv2": {"weight": torch.zeros(6, 8, 3, 3), "bias": torch.zeros(6)}}
    with pytest.warns(speedup.SpeedupWarning, match="one entry is kept"):
        check_speedup(model, masks, dummy(), fresh())


@pytest.mark.parametrize(
    "module, mask_shape", [("conv1", (8, 1, 1)), ("fc", (4,))], ids=["conv-channels", "linear-features"]
)
def test_output_mask_with_fewer_dims_than_the_output_is_accepted(module, mask_shape):
    # A mask broadcasts to its target right-aligned: (8, 1, 1) masks the channels of a (N, 8, H, W)
    # output and (4,) the features of a (N, 4) one. Neither has a batch dimension to check.
    model = small_net()
    masks = {module: {"_output_0": keep_mask(mask_shape[0]).reshape(mask_shape)}}
    check_speedup(model, masks, dummy(), fresh())


def test_masks_loaded_from_a_file_with_map_location_cpu(tmp_path):
    model = small_net()
    masks = good_masks(model)
    path = tmp_path / "masks.pth"
    torch.save(masks, path)
    reference = masked_copy(model, masks)
    result = speedup.ModelSpeedup(model, dummy(), str(path), map_location="cpu").speedup_model()
    assert result is model
    assert model.conv1.out_channels == 4 and model.conv2.in_channels == 4
    assert_same_outputs(reference, model, fresh())


def test_masks_loaded_from_a_file_with_a_callable_map_location(tmp_path):
    model = small_net()
    masks = good_masks(model)
    path = tmp_path / "masks.pth"
    torch.save(masks, path)
    reference = masked_copy(model, masks)
    seen = []

    def to_cpu(storage, location):
        seen.append(location)
        return storage

    speedup.ModelSpeedup(model, dummy(), path, map_location=to_cpu).speedup_model()
    assert seen, "map_location was not used to load the masks"
    assert model.conv1.out_channels == 4
    assert_same_outputs(reference, model, fresh())


def test_masks_loaded_from_a_file_with_a_lambda_and_device_map_location(tmp_path):
    model = small_net()
    masks = good_masks(model)
    path = tmp_path / "masks.pth"
    torch.save(masks, path)
    for map_location in (lambda storage, loc: storage, torch.device("cpu"), {"cpu": "cpu"}):
        candidate = small_net()
        candidate.load_state_dict(model.state_dict())
        reference = masked_copy(candidate, masks)
        speedup.ModelSpeedup(candidate, dummy(), str(path), map_location=map_location).speedup_model()
        assert candidate.conv1.out_channels == 4, map_location
        assert_same_outputs(reference, candidate, fresh())


def test_dict_masks_with_map_location_cpu():
    model = small_net()
    masks = good_masks(model)
    report = check_speedup(model, masks, dummy(), fresh(), shrunk=["conv1.weight", "conv2.weight"], map_location="cpu")
    assert report.params_after < report.params_before


def test_model_speedup_returns_the_same_model_and_sets_the_report():
    model = small_net()
    masks = good_masks(model)
    reference = masked_copy(model, masks)
    runner = speedup.ModelSpeedup(model, dummy(), masks)
    assert runner.report is None
    result = runner.speedup_model()
    assert result is model
    assert isinstance(runner.report, speedup.ShrinkReport)
    assert "conv1" in runner.report.modules
    assert runner.report.params_after < runner.report.params_before
    assert_same_outputs(reference, model, fresh())



def test_a_module_the_dummy_input_never_reaches_is_named_in_a_warning():
    """An auxiliary head that only runs in training keeps its sizes; the user is told which one."""

    class WithAuxiliary(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head, self.aux = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 2)

        def forward(self, x):
            hidden = torch.relu(self.body(x))
            return (self.head(hidden), self.aux(hidden)) if self.training else self.head(hidden)

    model = WithAuxiliary()
    with pytest.warns(speedup.SpeedupWarning, match="'aux' did not run on the dummy input"):
        speedup.shrink(model, {"body": {"weight": rows(keep_mask(8), (8, 4))}}, torch.randn(2, 4))
    assert model.body.out_features == 4 and model.aux.in_features == 8


class PicksByRank(nn.Module):
    """Keeps the two largest features of each sample (as a detector keeps its best-scored queries)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(2, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h.gather(1, h.topk(2, dim=1).indices))


def test_a_model_that_does_not_verify_and_picks_by_rank_is_told_why_that_may_be(monkeypatch):
    import speedup.engine as engine

    monkeypatch.setattr(engine, "_verify", lambda *args, **options: engine._Check(False, None, "outputs differ"))
    torch.manual_seed(0)
    model = PicksByRank().eval()
    before = state_and_structure(model)
    masks = {"a": {"weight": rows(keep_mask(8, 0.5, torch.Generator().manual_seed(0)), (8, 4))}}
    expected = r"picks entries by rank or compares values exactly \(aten\.topk\.default .*another dummy input"
    with pytest.raises(speedup.VerificationError, match=expected):
        speedup.shrink(model, masks, torch.randn(2, 4))
    assert_unchanged(model, before)


class Peaks(nn.Module):
    """CenterNet's peaks: a heatmap where it equals its local maximum."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        heat = self.b(torch.relu(self.a(x)))
        return heat * (F.max_pool2d(heat, 3, 1, 1) == heat)


def test_a_model_that_does_not_verify_and_compares_values_exactly_is_told_why_that_may_be(monkeypatch):
    import speedup.engine as engine

    monkeypatch.setattr(engine, "_verify", lambda *args, **options: engine._Check(False, None, "outputs differ"))
    model = Peaks().eval()
    masks = output_channel_masks(model, ["a"])
    with pytest.raises(speedup.VerificationError, match=r"compares values exactly \(aten\.eq\.Tensor"):
        speedup.shrink(model, masks, torch.randn(2, 3, 8, 8))


class CountsItsCalls(nn.Module):
    """Writes plain attributes in forward: a call counter and a cache."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.calls, self.cache = 0, None

    def forward(self, x):
        self.calls += 1
        self.cache = h = torch.relu(self.fc1(x))
        return self.fc2(h)


def test_attributes_a_model_writes_while_speedup_runs_it_are_restored_on_failure(monkeypatch):
    import speedup.engine as engine

    monkeypatch.setattr(engine, "_verify", lambda *args, **options: engine._Check(False, None, "outputs differ"))
    model = CountsItsCalls().eval()
    expect_failure(model, {"fc1": {"weight": rows(keep_mask(16), (16, 8))}}, speedup.VerificationError,
                   inputs=torch.randn(3, 8))
    assert model.calls == 0 and model.cache is None


class SizesItsStatisticsOnFirstCall(nn.Module):
    """Holds empty buffers that its first call resizes in place, as a quantization observer's running
    minimum and maximum are: every empty tensor is at address 0, and only one of the two came back."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.register_buffer("low", torch.empty(0))
        self.register_buffer("high", torch.empty(0))

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.low.numel() == 0:
            self.low.resize_(16).fill_(0.0)
            self.high.resize_(16).fill_(4.0)
        return self.fc2(torch.minimum(torch.maximum(h, self.low), self.high))


def test_buffers_a_model_resizes_while_speedup_runs_it_are_restored_on_failure(monkeypatch):
    import speedup.engine as engine

    monkeypatch.setattr(engine, "_verify", lambda *args, **options: engine._Check(False, None, "outputs differ"))
    model = SizesItsStatisticsOnFirstCall().eval()
    expect_failure(model, {"fc1": {"weight": rows(keep_mask(16), (16, 8))}}, speedup.VerificationError,
                   inputs=torch.randn(3, 8))
    assert model.low.shape == model.high.shape == (0,)


def test_an_undo_that_fails_does_not_stop_the_others_and_is_reported_after_the_error():
    from speedup.transaction import Transaction

    holder = nn.Linear(2, 2)
    first, second = holder.weight, holder.bias
    tx = Transaction()
    tx.set_attr(holder, "weight", nn.Parameter(torch.zeros(2, 2)))
    tx.on_rollback(lambda: 1 / 0)
    tx.set_attr(holder, "bias", nn.Parameter(torch.zeros(2)))
    with pytest.raises(speedup.RestoreError, match="could not undo 1 of its changes.*ZeroDivisionError"):
        tx.rollback()
    assert holder.weight is first and holder.bias is second


def test_a_replacement_function_changing_its_module_in_place_leaves_the_model_unchanged_on_failure(monkeypatch):
    """It is given a copy: one slicing the module it gets and returning it changed the model for good."""
    import speedup.engine as engine

    monkeypatch.setattr(engine, "_verify", lambda *args, **options: engine._Check(False, None, "outputs differ"))

    def slice_in_place(module, masks):
        module.weight = nn.Parameter(module.weight[:4].clone())
        return module

    model = small_net()
    expect_failure(model, good_masks(model), speedup.VerificationError,
                   customized_replace_func={nn.Conv2d: slice_in_place})


class ReturnsItsWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h), h.shape[-1]


def test_a_number_the_model_returns_keeps_the_size_it_was_read_from():
    """A width returned as a Python number changed silently (16 -> 8): verification compared tensors only."""
    model = ReturnsItsWidth()
    masks = {"fc1": {"weight": rows(keep_mask(16), (16, 8))}}
    report = check_speedup(model, masks, torch.randn(3, 8), torch.randn(5, 8))
    assert model(torch.randn(2, 8))[1] == 16 and report.kept_for_verification


class AppliedTwice(nn.Module):
    """A layer applied to its own output: an output mask on it cannot go structurally, and stays a hook."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.fc1(x)))))


def test_a_model_keeping_an_output_mask_hook_still_pickles():
    """The hook was a closure: torch.save of the sped-up model raised "Can't pickle local object"."""
    import io

    model = AppliedTwice()
    keep = torch.cat([torch.zeros(4), torch.ones(4)])
    check_speedup(model, {"fc1": {"_output_0": keep}}, torch.randn(3, 8), torch.randn(5, 8))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 8)
    torch.testing.assert_close(again(x), model(x))
