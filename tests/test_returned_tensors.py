"""Returned tensors keep their shapes; their constant channels go inside the model and are put back after it."""

from __future__ import annotations

import copy
import io
from collections import namedtuple

import pytest
import torch
from torch import nn

from speedup import SpeedupWarning
from speedup.groups import find_groups
from speedup.output_constants import PutBackConstants
from support.checks import check_speedup, keep_mask, output_channel_masks, rows

Pair = namedtuple("Pair", ["scores", "hidden"])


class ReturnsItsHiddenState(nn.Module):
    """Returns the scores and, besides, the hidden state they are computed from (as T5 returns its encoder's)."""

    def __init__(self, as_tuple: bool = False):
        super().__init__()
        self.up, self.down = nn.Linear(6, 16), nn.Linear(16, 3)
        self.as_tuple = as_tuple

    def forward(self, x):
        hidden = torch.relu(self.up(x))
        scores = self.down(hidden)
        return Pair(scores, hidden) if self.as_tuple else {"scores": scores, "hidden": hidden}


def _hidden_masks(with_bias: bool) -> dict:
    keep = keep_mask(16)
    return {"up": {"weight": rows(keep, (16, 6)), **({"bias": keep} if with_bias else {})}}


def test_a_returned_hidden_state_shrinks_inside_and_keeps_its_shape():
    model = ReturnsItsHiddenState()
    report = check_speedup(model, _hidden_masks(with_bias=True), torch.randn(2, 6), torch.randn(5, 6),
                           shrunk=["up.weight", "down.weight"])
    assert model(torch.randn(4, 6))["hidden"].shape == (4, 16)
    assert report.kept_for_verification == []


def test_non_zero_constants_are_put_back_in_a_named_tuple():
    model = ReturnsItsHiddenState(as_tuple=True)
    check_speedup(model, _hidden_masks(with_bias=False), torch.randn(2, 6), torch.randn(5, 6),
                  shrunk=["up.weight", "down.weight"])
    out = model(torch.randn(4, 6))
    assert type(out) is Pair and out.hidden.shape == (4, 16)
    assert bool((out.hidden[:, ~_kept_rows(model)] > 0).any()), "relu(bias) of the masked rows is put back"


def _kept_rows(model) -> torch.Tensor:
    hook = next(h for h in model._forward_hooks.values() if isinstance(h, PutBackConstants))
    (_, dims), = hook.restores
    kept = torch.zeros(16, dtype=torch.bool)
    kept[dims[0].kept] = True
    return kept


def test_masked_output_channels_of_the_last_layer_are_not_computed():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 10))
    keep = keep_mask(10)
    check_speedup(model, {"2": {"weight": rows(keep, (10, 8))}}, torch.randn(2, 6), torch.randn(3, 6),
                  shrunk=["2.weight"])
    assert model[2].out_features == int(keep.sum()) and model(torch.randn(3, 6)).shape == (3, 10)


class DropsATensorItMakes(nn.Module):
    """Makes a tensor of the batch's size and drops it (timm's Gemma 4 patch embedding's default patch
    coordinates), besides its layers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.pooled_norm = nn.Linear(8, 32), nn.Linear(32, 4), nn.LayerNorm(32)

    def forward(self, x):
        torch.ones(x.shape[0], 5, dtype=torch.bool)
        h = torch.relu(self.fc1(x))
        self.pooled_norm(h)  # a pooled output made and dropped (CLIP's vision tower, under an image classifier)
        return self.fc2(h)


def test_a_tensor_the_model_makes_and_drops_is_left_as_made_without_a_warning():
    """Its dimensions, unused, lost every entry but one, with two warnings about a layer that should go.
    A layer whose output is dropped still does not keep the features it reads."""
    model = DropsATensorItMakes().eval()
    keep = keep_mask(32)
    with pytest.warns(SpeedupWarning) as caught:
        check_speedup(model, {"fc1": {"weight": rows(keep, (32, 8)), "bias": keep}}, torch.randn(1, 8),
                      torch.randn(3, 8), shrunk=["fc1.weight", "fc2.weight"])
    assert [str(w.message) for w in caught if "ones" in str(w.message)] == []

class ConstantThroughASharedLayer(nn.Module):
    """A layer called on two different constant inputs, its second result returned through a classifier."""

    def __init__(self):
        super().__init__()
        self.stem, self.shared, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        self.shared(x)  # a call whose result nothing reads
        return self.head(self.shared(torch.nn.functional.hardswish(x)).mean((2, 3)))


def test_a_returned_entry_kept_only_so_the_model_stays_valid_holds_its_constant():
    """The stem's weight is all masked: every returned score is a constant and every layer goes but one
    entry. That entry, computed from what stayed (folded for one call of the shared layer, not for
    the other), is not what the masked model returns: the constant is written there too."""
    model = ConstantThroughASharedLayer()
    masks = {"stem": {"weight": torch.zeros(8, 3, 3, 3)}}
    with pytest.warns(SpeedupWarning, match="one entry is kept"):
        check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 7),
                      shrunk=["stem.weight", "shared.weight", "head.weight"])


def test_a_sped_up_model_that_puts_constants_back_pickles_and_copies():
    model = ReturnsItsHiddenState()
    check_speedup(model, _hidden_masks(with_bias=False), torch.randn(2, 6), torch.randn(5, 6), shrunk=["up.weight"])
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    x = torch.randn(3, 6)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert all(torch.equal(a, b) for a, b in zip(model(x).values(), twin(x).values()))


def test_groups_offer_a_returned_hidden_state_but_not_the_scores():
    groups = find_groups(ReturnsItsHiddenState(), torch.randn(2, 6))
    touched = {(m.parameter, m.dim) for g in groups for m in g.members}
    assert ("up.weight", 0) in touched
    assert ("down.weight", 0) not in touched


class AttendsOverKeptKeys(nn.Module):
    """Attention over the keys ``keep`` marks: a sample that keeps none gets NaN (a softmax over -inf)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, keep):
        scores = (self.q(x) @ self.k(x).transpose(1, 2)).masked_fill(~keep[:, None, :], float("-inf"))
        return self.out(scores.softmax(-1) @ self.v(x))


def test_outputs_that_are_nan_where_the_masked_models_are_count_as_equal():
    torch.manual_seed(0)
    model = AttendsOverKeptKeys().eval()
    masks = output_channel_masks(model, ["q", "k", "v"])
    masks["k"] = masks["q"]  # the features the scores sum over
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0] = False  # the first sample attends to nothing
    check_speedup(model, masks, (torch.randn(2, 5, 8), keep), (torch.randn(2, 7, 8), keep[:, :1].expand(2, 7)),
                  shrunk=["q.weight", "k.weight", "v.weight"])


class AnchorHead(nn.Module):
    """RetinaNet's class head: ``(N, anchors * classes, H, W)`` returned as ``(N, H * W * anchors, classes)``,
    every logit's bias the same prior."""

    def __init__(self):
        super().__init__()
        self.sub, self.logits = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 3 * 5, 3, padding=1)
        nn.init.constant_(self.logits.bias, -4.6)

    def forward(self, x):
        n, _, h, w = x.shape
        logits = self.logits(torch.relu(self.sub(x)))
        return logits.view(n, -1, 5, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 5)


def test_a_returned_dimension_repeating_channels_over_positions_keeps_every_entry():
    """Masked away, the branch leaves every logit its bias: the anchors went inside and the hook put
    them back at the dummy's resolution only (at another, the sped-up model returned a tensor a third
    as long)."""
    model = AnchorHead().eval()
    masks = {"sub": {"weight": torch.zeros(8, 4, 3, 3), "bias": torch.zeros(8)}}
    check_speedup(model, masks, torch.randn(2, 4, 8, 8), torch.randn(1, 4, 12, 10), shrunk=["sub.weight"])
    assert model.logits.out_channels == 15


class Contrastive(nn.Module):
    """BLIP-2's image-text similarity: every query against every text, squeezed, its best query kept."""

    def __init__(self):
        super().__init__()
        self.vision, self.text = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, queries, text):
        image = nn.functional.normalize(self.vision(queries), dim=-1)
        words = nn.functional.normalize(self.text(text), dim=-1)
        return torch.matmul(image.unsqueeze(1), words.unsqueeze(-1)).squeeze().max(-1)[0]


@pytest.mark.parametrize("batch", [1, 3])
def test_a_constant_output_squeezed_to_other_dimensions_is_left_as_computed(batch):
    """Masked away, the image side makes every similarity zero. A batch of one squeezes the result to
    a number, where the hook putting constants back raised IndexError: a tensor without the planned
    entries is left as computed (on the dummy input, it fails verification)."""
    model = Contrastive().eval()
    masks = {"vision": {"weight": torch.zeros(4, 8), "bias": torch.zeros(4)}}
    with pytest.warns(SpeedupWarning, match="one entry is kept"):
        check_speedup(model, masks, (torch.randn(2, 3, 8), torch.randn(2, 8)),
                      (torch.randn(batch, 3, 8), torch.randn(batch, 8)))
