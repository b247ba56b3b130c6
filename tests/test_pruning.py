"""speedup.pruning: metrics on hand-computed cases, allocation, dependency groups, schedules, objectives,
config errors, plugins; and pruned-then-sped-up models equal to their masked versions."""

import copy
import types

import pytest
import torch
import torchvision
from torch import nn

import speedup
from speedup.errors import ConfigError
from speedup.plugins import manager
from speedup.pruning import AGP, Calibration, Linear, Metric, Objective, OneShot, Pruner, masks_applied, prune
from speedup.pruning import objective as objective_search
from speedup.testing import parameter_count
from support.checks import check_speedup, randomize_norms

X = torch.randn(1, 3, 16, 16)


class Plain(nn.Module):
    """Convs with BatchNorm and a classifier, no residual links."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.b(torch.relu(self.a(x)))
        return self.head(x.mean((2, 3)))


def _linear(weight) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float32))
    return layer


def _removed_rows(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask.reshape(mask.shape[0], -1).eq(0).all(1)).flatten().tolist()


def _one_layer(weight, metric, ratio, **options):
    model = nn.Sequential(_linear(weight))
    masks = prune(model, [{"op_types": ["Linear"], "sparse_ratio": ratio}], torch.randn(1, len(weight[0])), metric,
                  dependency_aware=False, **options)
    return _removed_rows(masks["0"]["weight"])


# -- metrics, against hand-computed scores -----------------------------------------------------------------------

WEIGHT = [[1.0, -1.0, 0.0], [0.5, 0.5, 0.5], [3.0, 0.0, 0.0], [0.0, 0.0, -0.2]]
# L1 row norms 2.0, 1.5, 3.0, 0.2; L2 norms 1.414, 0.866, 3.0, 0.2


def test_l1_and_l2_remove_the_rows_of_smallest_norm():
    assert sorted(_one_layer(WEIGHT, "l1", 0.5)) == [1, 3]  # 1.5 and 0.2
    # L2 orders rows 0 (1.414) and 1 (0.866) the same way here; a case where L1 and L2 disagree:
    weight = [[1.0, 1.0, 1.0, 1.0], [1.9, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]]  # L1 4, 1.9, 5; L2 2, 1.9, 5
    assert _one_layer(weight, "l1", 0.34) == [1]
    weight = [[1.0, 1.0, 1.0, 1.0], [2.1, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]]  # L1 4, 2.1, 5; L2 2, 2.1, 5
    assert _one_layer(weight, "l1", 0.34) == [1]
    assert _one_layer(weight, "l2", 0.34) == [0]


def test_fpgm_removes_the_row_nearest_the_geometric_median():
    # Rows on a line at 0, 1, 2 and 10: sums of distances 13, 11, 11, 27 -> a tie broken by position: row 1.
    weight = [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0]]
    assert _one_layer(weight, "fpgm", 0.25) == [1]
    weight = [[0.0, 0.0], [1.0, 0.0], [2.5, 0.0], [10.0, 0.0]]  # sums 13.5, 11.5, 12.5, 26.5
    assert _one_layer(weight, "fpgm", 0.25) == [1]


def test_slim_scores_batchnorm_scales_and_refuses_other_layers():
    model = Plain().eval()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([0.9, -0.1, 0.5, 0.05, -2.0, 0.3, 0.2, 1.0]))
    masks = prune(model, [{"op_names": ["bn1"], "sparse_ratio": 0.25}], X, "slim", dependency_aware=False)
    assert _removed_rows(masks["bn1"]["weight"]) == [1, 3]  # |-0.1| and 0.05
    with pytest.raises(ConfigError, match="slim.*'conv1.weight' is a Conv2d.*BatchNorm"):
        prune(model, [{"op_names": ["conv1"], "sparse_ratio": 0.5}], X, "slim")


def _relu_probe():
    """Linear with identity weights: the output channels are the inputs themselves."""
    return nn.Sequential(_linear([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_apoz_and_mean_activation_read_each_channel_after_a_relu():
    batches = [torch.tensor([[1.0, -1.0, 0.5], [2.0, 3.0, -1.0]]), torch.tensor([[4.0, -2.0, -3.0]])]
    # After ReLU: channel 0 -> 1, 2, 4 (no zeros, mean 7/3); channel 1 -> 0, 3, 0 (2/3 zeros, mean 1);
    # channel 2 -> 0.5, 0, 0 (2/3 zeros, mean 1/6).
    calibration = Calibration(batches)
    model = _relu_probe()
    masks = prune(model, [{"op_types": ["Linear"], "sparse_ratio": 0.34}], batches[0], "mean_activation",
                  calibration=calibration, dependency_aware=False)
    assert _removed_rows(masks["0"]["weight"]) == [2]
    masks = prune(model, [{"op_types": ["Linear"], "sparse_ratio": 0.67}], batches[0], "apoz",
                  calibration=calibration, dependency_aware=False)
    assert _removed_rows(masks["0"]["weight"]) == [1, 2]
    metric = speedup.pruning.metrics.Activation("apoz")
    pruner = Pruner(model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], batches[0], metric,
                    calibration=calibration, dependency_aware=False)
    pruner.compute_masks()
    assert torch.allclose(metric.score(pruner.targets[0]), torch.tensor([1.0, 1 / 3, 1 / 3]))


def test_taylor_accumulates_weight_times_gradient_squared():
    weight = [[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]]
    model = nn.Sequential(_linear(weight))
    inputs = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    # loss = sum(y) -> dL/dW[i, j] = x[j]: batch 1 grads rows (1, 0), batch 2 rows (0, 2).
    # Row scores: sum_j (w_ij * g_ij)^2 over both batches: row 0: 1 + 16 = 17; row 1: 9 + 4 = 13; row 2: .25 + 1 = 1.25
    metric = speedup.pruning.metrics.Taylor()
    pruner = Pruner(model, [{"op_types": ["Linear"], "sparse_ratio": 0.34}], inputs[0], metric,
                    calibration=Calibration(inputs, loss=lambda output, label: output.sum()), dependency_aware=False)
    masks = pruner.compute_masks()
    assert torch.allclose(metric.score(pruner.targets[0]), torch.tensor([17.0, 13.0, 1.25]))
    assert _removed_rows(masks["0"]["weight"]) == [2]
    assert model[0].weight.grad is None  # gradients are given back as they were
    with pytest.raises(ConfigError, match="taylor metric needs calibration batches and a loss"):
        prune(model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], inputs[0], "taylor")


def test_random_is_seeded():
    weight = torch.randn(10, 4).tolist()
    first = _one_layer(weight, "random", 0.5, seed=3)
    assert first == _one_layer(weight, "random", 0.5, seed=3) and len(first) == 5


# -- allocation --------------------------------------------------------------------------------------------------

def test_uniform_allocation_removes_the_ratio_of_every_layer_with_its_bias():
    model = Plain().eval()
    masks = prune(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], X, dependency_aware=False)
    assert len(_removed_rows(masks["conv1"]["weight"])) == 4 and len(_removed_rows(masks["conv2"]["weight"])) == 8
    assert _removed_rows(masks["conv1"]["bias"]) == _removed_rows(masks["conv1"]["weight"])


def test_global_group_meets_the_total_ratio_within_min_and_max():
    model = nn.Sequential(nn.Linear(4, 10), nn.Linear(10, 10))
    with torch.no_grad():
        model[0].weight.mul_(0.01)  # the first layer matters least everywhere
    config = [{"op_types": ["Linear"], "sparse_ratio": 0.5, "global_group_id": "all", "max_sparse_ratio": 0.8}]
    masks = prune(model, config, torch.randn(1, 4), dependency_aware=False)
    removed = [len(_removed_rows(masks[n]["weight"])) for n in ("0", "1")]
    assert sum(removed) == 10 and removed == [8, 2]
    config[0]["min_sparse_ratio"] = 0.3
    masks = prune(model, config, torch.randn(1, 4), dependency_aware=False)
    assert [len(_removed_rows(masks[n]["weight"])) for n in ("0", "1")] == [7, 3]


def test_one_unit_always_stays():
    masks = prune(nn.Sequential(nn.Linear(4, 2)), [{"op_types": ["Linear"], "sparse_ratio": 0.9}], torch.randn(1, 4),
                  dependency_aware=False)
    assert len(_removed_rows(masks["0"]["weight"])) == 1


def test_explicit_dependency_group_prunes_the_same_rows():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6))
    config = [{"op_types": ["Linear"], "sparse_ratio": 0.5, "dependency_group_id": 1}]
    masks = prune(model, config, torch.randn(1, 4), dependency_aware=False)
    assert _removed_rows(masks["0"]["weight"]) == _removed_rows(masks["1"]["weight"])
    assert len(_removed_rows(masks["0"]["weight"])) == 3
    bad = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 8))
    with pytest.raises(ConfigError, match="different numbers of units"):
        prune(bad, config, torch.randn(1, 4), dependency_aware=False)


def test_align_copies_the_channels_of_another_modules_mask():
    model = Plain().eval()
    config = [{"op_names": ["conv2"], "sparse_ratio": 0.5},
              {"op_names": ["bn2"], "align": {"module_name": "conv2", "target_name": "weight", "dims": [0]}}]
    masks = prune(model, config, X, dependency_aware=False)
    assert _removed_rows(masks["bn2"]["weight"]) == _removed_rows(masks["conv2"]["weight"])
    assert _removed_rows(masks["bn2"]["bias"]) == _removed_rows(masks["conv2"]["weight"])


def test_block_granularity_masks_whole_blocks():
    model = nn.Sequential(nn.Linear(8, 4))
    masks = prune(model, [{"op_types": ["Linear"], "sparse_ratio": 0.5, "granularity": [2, 4]}], torch.randn(1, 8),
                  dependency_aware=False)
    blocks = masks["0"]["weight"].reshape(2, 2, 2, 4).permute(0, 2, 1, 3).reshape(4, 8)
    assert blocks.eq(0).all(1).sum() == 2 and (blocks.eq(0).all(1) | blocks.eq(1).all(1)).all()


# -- dependency groups -------------------------------------------------------------------------------------------

def test_dependency_groups_prune_both_sides_of_a_residual_add_and_everything_goes():
    model = randomize_norms(Residual()).eval()
    masks = prune(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], X)
    assert _removed_rows(masks["stem"]["weight"]) == _removed_rows(masks["b"]["weight"])
    assert _removed_rows(masks["bn"]["weight"]) == _removed_rows(masks["stem"]["weight"])  # the BatchNorm follows
    assert len(_removed_rows(masks["a"]["weight"])) == 16
    report = check_speedup(model, masks, X, torch.randn(3, 3, 20, 20), shrunk=["stem.weight", "a.weight", "b.weight"])
    assert report.masked_but_kept == {}


def test_an_excluded_module_keeps_the_channels_it_shares():
    model = Residual().eval()
    with pytest.warns(speedup.SpeedupWarning, match="coupled with 'stem'"):
        masks = prune(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "exclude_op_names": ["stem"]}], X)
    assert "stem" not in masks and "bn" not in masks and not _removed_rows(masks["b"]["weight"])
    assert len(_removed_rows(masks["a"]["weight"])) == 16  # a's own channels still go, and b's columns reading them
    assert len(_removed_rows(masks["b"]["weight"].transpose(0, 1))) == 16


def test_channels_that_cannot_be_removed_are_not_pruned():
    model = Plain().eval()
    with pytest.warns(speedup.SpeedupWarning, match="fc.weight: its channels cannot be removed"):
        masks = prune(model, [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5}], X)
    assert "weight" not in masks.get("fc", {}) or not _removed_rows(masks["fc"]["weight"])  # the class scores stay


def test_heads_are_pruned_whole():
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    model = nn.Sequential(layer).eval()
    tokens = torch.randn(1, 5, 32)
    masks = prune(model, [{"op_types": ["MultiheadAttention"], "granularity": "head", "sparse_ratio": 0.5}], tokens)
    rows = masks["0.self_attn"]["in_proj_weight"].eq(0).all(1).reshape(3, 4, 8)
    assert rows.all(2).sum(1).tolist() == [2, 2, 2] and (rows.all(2) == rows.any(2)).all()  # 2 of 4 heads, whole
    with pytest.raises(ConfigError, match="no attention heads"):
        prune(model, [{"op_names": ["0.linear1"], "granularity": "head", "sparse_ratio": 0.5}], tokens)


# -- pruned, then sped up ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, metric", [("resnet18", "l1"), ("resnet50", "fpgm"), ("mobilenet_v2", "l2")])
def test_pruned_torchvision_models_lose_every_pruned_channel(name, metric):
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.get_model(name, weights=None)).eval()
    x = torch.randn(1, 3, 64, 64)
    masks = prune(model, [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5}], x, metric)
    report = check_speedup(model, masks, x, torch.randn(2, 3, 72, 72), max_param_ratio=0.45)
    assert report.masked_but_kept == {} and report.flops_ratio < 0.35


def test_pruned_bert_sized_encoder_loses_heads_ffn_and_hidden_channels():
    """BERT-base's layer sizes (hidden 768, 12 heads, FFN 3072), four layers and a small vocabulary to stay fast."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True, activation="gelu")
    encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
    model = nn.Sequential(nn.Embedding(1000, 768), nn.LayerNorm(768), encoder, nn.Linear(768, 3)).eval()
    config = [{"op_types": ["MultiheadAttention"], "granularity": "head", "sparse_ratio": 0.5},
              {"op_types": ["Linear"], "sparse_ratio": 0.5}]
    tokens = torch.randint(0, 1000, (1, 16))
    with pytest.warns(speedup.SpeedupWarning, match="3.weight: its channels cannot be removed"):
        masks = prune(model, config, tokens, "l2")
    report = check_speedup(model, masks, tokens, torch.randint(0, 1000, (3, 9)), max_param_ratio=0.3,
                           shrunk=["0.weight", "2.layers.0.linear1.weight", "2.layers.0.self_attn.out_proj.weight"])
    assert report.masked_but_kept == {}
    assert model[2].layers[0].self_attn.num_heads == 6


# -- schedules and objectives ------------------------------------------------------------------------------------

def test_schedule_fractions():
    assert OneShot().fractions() == [1.0]
    assert Linear(4).fractions() == [0.25, 0.5, 0.75, 1.0]
    assert AGP(2).fractions() == [0.875, 1.0]


def test_iterative_pruning_keeps_removed_units_and_trains_the_masked_model():
    model = randomize_norms(Residual()).eval()
    steps, removed = [], []

    def fine_tune(model, masks, step):
        steps.append(step)
        removed.append(set(_removed_rows(masks["a"]["weight"])))
        with torch.no_grad():
            model.a.weight.fill_(1.0)  # an "optimizer step" that would revive pruned rows
        model(X)
        assert set(_removed_rows(model.a.weight)) == removed[-1]  # the masks are applied again before forward

    masks = Pruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], X, "fpgm").run(fine_tune, "linear", steps=3)
    assert steps == [0, 1, 2] and [len(r) for r in removed] == [5, 11, 16]
    assert removed[0] <= removed[1] <= removed[2]
    assert set(_removed_rows(model.a.weight)) == removed[-1]  # the model stays masked afterwards
    check_speedup(model, masks, X, torch.randn(2, 3, 12, 12), shrunk=["a.weight"])


def test_objective_search_meets_a_flops_ratio():
    model = randomize_norms(torchvision.models.resnet18()).eval()
    x = torch.randn(1, 3, 32, 32)
    masks = Pruner(model, [{"op_types": ["Conv2d"]}], x).run(objective=Objective("flops", 0.6, tolerance=0.03))
    report = speedup.shrink(copy.deepcopy(model), masks, x)
    assert 0.55 <= report.flops_ratio <= 0.6


def test_objective_search_meets_a_parameter_ratio_and_a_measured_latency_ratio(monkeypatch):
    model = randomize_norms(Residual()).eval()
    pruner = Pruner(model, [{"op_types": ["Conv2d"]}], X)
    masks = pruner.run(objective=Objective("params", 0.5, tolerance=0.05))
    report = speedup.shrink(copy.deepcopy(model), masks, X)
    assert 0.45 <= report.param_ratio <= 0.5 and pruner.reached == pytest.approx(report.param_ratio)
    big = torch.randn(8, 3, 64, 64)
    assert objective_search._latency(model, big, repeats=1) > 0
    # The latency of each model the search measures, as a clock that other work on the machine cannot
    # disturb (a test is no benchmark): its parameter count.
    timed = []
    monkeypatch.setattr(objective_search, "_latency", lambda m, inputs, repeats: timed.append(m) or parameter_count(m))
    pruner = Pruner(model, [{"op_types": ["Conv2d"]}], big)
    pruner.run(objective=Objective("latency", 0.6, tolerance=0.1, repeats=3))
    assert pruner.reached <= 0.6 and timed[0] is model  # measured on the sped-up copies, against the original
    assert all(parameter_count(m) < parameter_count(model) for m in timed[1:])


def test_masks_applied_multiplies_and_unhooks():
    model = Plain()
    masks = {"conv1": {"weight": torch.zeros_like(model.conv1.weight)}}
    with masks_applied(model, masks):
        assert model.conv1.weight.abs().sum() == 0
    assert not model.conv1._forward_pre_hooks


# -- config lists ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ([{"op_types": ["Conv2d"], "sparsity_ratio": 0.5}], r"\['sparsity_ratio'\] is not a config key"),
    ([{"op_types": ["Conv2d"], "sparse_ratio": 1.5}], "between 0 and 1"),
    ([{"op_types": ["Conv2d"], "sparse_ratio": 1.0}], "would remove every unit"),
    ([{"sparse_ratio": 0.5}], "selects nothing"),
    ([{"op_names": ["conv9"], "sparse_ratio": 0.5}], "'conv9', which the model does not have"),
    ([{"op_types": ["Conv3d"], "sparse_ratio": 0.5}], r"config_list\[0\] selects no module"),
    ([{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": "rows"}], "no granularity named 'rows'"),
    ([{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": [2, 2]}], "2 block sizes for 'conv1.weight'"),
    ([{"op_types": ["Conv2d"], "sparse_threshold": 0.1}], "sparse_threshold.*not supported"),
    ([{"op_types": ["Conv2d"], "min_sparse_ratio": 0.6, "max_sparse_ratio": 0.5}], "exceeds max_sparse_ratio"),
    ([{"op_types": ["Conv2d"]}], r"config_list\[0\] has no sparse_ratio"),
    ([{"op_names_re": ["conv("], "sparse_ratio": 0.5}], "not a regular expression"),
    ("conv", "non-empty list of dicts"),
    ([{"op_names": ["bn1"], "align": {"module_name": "conv1"}}], "has no mask to align 'bn1' with"),
])
def test_invalid_configs_get_clear_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        prune(Plain(), config, X)


def test_nni_2_keys_and_exclusions():
    model = Plain()
    masks = prune(model, [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5}, {"op_names": ["conv1"], "exclude": True}],
                  X, dependency_aware=False)
    assert list(masks) == ["conv2"]
    masks = prune(model, [{"op_types": ["Conv2d"], "total_sparsity": 0.5}], X, dependency_aware=False)
    assert sum(len(_removed_rows(masks[n]["weight"])) for n in masks) == 12


def test_unknown_metric_is_a_clear_error():
    with pytest.raises(ConfigError, match="no metric named 'l3'.*known: apoz, fpgm, l1"):
        prune(Plain(), [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], X, "l3")


# -- plugins -----------------------------------------------------------------------------------------------------

def test_a_plugin_contributes_a_metric_through_the_hook():
    class LastRowsFirst(Metric):
        name = "last_rows_first"

        def score(self, target):
            return -torch.arange(target.units, dtype=torch.float32)

    plugin = types.ModuleType("my_pruning_plugin")
    plugin.speedup_register_pruning = speedup.hookimpl(lambda registry: registry.add_metric("last", LastRowsFirst))
    loaded = manager.load_plugins(extra=[plugin])
    assert "metric last" in loaded.plugins[-1].pruning
    pruner = Pruner(Plain(), [{"op_names": ["conv2"], "sparse_ratio": 0.25}], X, "last", registry=loaded.pruning,
                    dependency_aware=False)
    assert _removed_rows(pruner.compute_masks()["conv2"]["weight"]) == [12, 13, 14, 15]
    core = next(p for p in loaded.plugins if p.name == "torch")
    assert {"metric l1", "schedule agp", "granularity head"} <= set(core.pruning)


def test_gpt2_conv1d_heads_and_ffn_through_the_transformers_plugin():
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, use_cache=False,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(config).eval()
    tokens = torch.randint(0, 100, (1, 10))
    config_list = [{"op_names_re": [r"h\.\d+\.attn\.c_attn"], "granularity": "head", "sparse_ratio": 0.5},
                   {"op_names_re": [r"h\.\d+\.mlp\.c_fc"], "sparse_ratio": 0.5}]
    masks = prune(model, config_list, tokens, "l1")
    report = check_speedup(model, masks, tokens, torch.randint(0, 100, (2, 7)),
                           shrunk=["h.0.attn.c_attn.weight", "h.1.mlp.c_fc.weight", "h.1.mlp.c_proj.weight"])
    assert report.masked_but_kept == {} and model.h[0].attn.num_heads == 2


def test_dependency_groups_prune_each_producer_of_a_concatenation_by_its_ratio():
    from test_groups import Concat

    model = Concat().eval()
    x = torch.randn(1, 3, 8, 8)
    masks = prune(model, [{"op_names": ["a", "b"], "sparse_ratio": 0.5}], x, "l2")
    assert [len(_removed_rows(masks[name]["weight"])) for name in ("a", "b")] == [4, 12]
