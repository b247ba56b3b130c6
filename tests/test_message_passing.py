"""Graph networks and other code that writes or reduces rows into positions an index chooses, and the
small contractions such code calls: against the masked model."""

import pytest
import torch
from torch import nn

from support.checks import check_speedup, rows

F_IN, HIDDEN = 8, 16
KEEP = torch.arange(HIDDEN) % 2 == 0

AGGREGATIONS = {  # messages h[src] summed (or reduced, or written) into their destination nodes
    "index_add_": lambda h, msg, dst: torch.zeros_like(h).index_add_(0, dst, msg, alpha=0.5),
    "scatter_add": lambda h, msg, dst: torch.zeros_like(h).scatter_add(0, dst[:, None].expand(-1, h.shape[1]), msg),
    "scatter_reduce amax": lambda h, msg, dst: torch.zeros_like(h).scatter_reduce(
        0, dst[:, None].expand_as(msg), msg, "amax", include_self=False),
    "scatter_reduce mean": lambda h, msg, dst: h.scatter_reduce(0, dst[:, None].expand_as(msg), msg, "mean"),
    "index_reduce prod": lambda h, msg, dst: h.index_reduce(0, dst, msg, "prod"),
    "index_copy": lambda h, msg, dst: torch.zeros_like(h).index_copy(0, torch.arange(h.shape[0] - 1, -1, -1), h),
    "scatter of zero": lambda h, msg, dst: h.scatter(0, dst[:, None].expand_as(msg), 0.0),
    "index_fill of zero": lambda h, msg, dst: h.index_fill(0, dst, 0.0),
}


class MessagePassing(nn.Module):
    """One round of message passing: node features projected, sent along the edges, aggregated at
    their destinations, then a layer and a head per node."""

    def __init__(self, aggregate):
        super().__init__()
        self.aggregate = aggregate
        self.embed, self.update, self.head = nn.Linear(F_IN, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, 3)

    def forward(self, x, edges):
        h = self.embed(x)
        src, dst = edges
        return self.head(torch.relu(self.update(torch.relu(self.aggregate(h, h[src], dst)))))


def _graph(nodes: int, edges: int) -> tuple:
    return torch.randn(nodes, F_IN), torch.randint(0, nodes, (2, edges))


@pytest.mark.filterwarnings("ignore:index_reduce")
@pytest.mark.parametrize("aggregate", AGGREGATIONS.values(), ids=AGGREGATIONS.keys())
def test_features_aggregated_at_the_nodes_an_index_names_pass_through(aggregate):
    """``index_add_`` / ``scatter_add`` and their kin were barriers: the features masked in the
    embedding stayed, and so did the columns of the layer after them."""
    torch.manual_seed(0)
    model = MessagePassing(aggregate).eval()
    masks = {"embed": {"weight": rows(KEEP, (HIDDEN, F_IN)), "bias": KEEP}}
    report = check_speedup(model, masks, _graph(5, 12), _graph(7, 20), shrunk=["embed.weight", "update.weight"])
    assert model.update.in_features == HIDDEN // 2 and not report.barriers


WHOLE = {  # what such an operator computes differs where a feature goes, or is not a zero
    "bias left: sums of constants": (lambda h, msg, dst: torch.zeros_like(h).index_add(0, dst, msg), False),
    "into a buffer": (lambda h, msg, dst: h.new_ones(h.shape).index_add(0, dst, msg), True),
    "along the features": (lambda h, msg, dst: torch.zeros_like(h).index_add(1, torch.arange(h.shape[1]).flip(0), h),
                           True),
    "index narrower than the features": (
        lambda h, msg, dst: torch.zeros_like(h).scatter_add(0, dst[:, None].expand(-1, 4), msg), True),
    "filled with one": (lambda h, msg, dst: h.index_fill(0, dst, 1.0), True),
}


@pytest.mark.parametrize("aggregate, bias_masked", WHOLE.values(), ids=WHOLE.keys())
def test_features_an_aggregation_does_not_pass_alone_are_kept(aggregate, bias_masked):
    """A masked feature with a bias sums to a multiple of it that varies with the edges, a tensor of
    ones written into is no zero, an index along the features reads them by position: each keeps
    the embedding whole, and the outputs stay equal."""
    torch.manual_seed(0)
    model = MessagePassing(aggregate).eval()
    masks = {"embed": {"weight": rows(KEEP, (HIDDEN, F_IN))} | ({"bias": KEEP} if bias_masked else {})}
    check_speedup(model, masks, _graph(5, 12), _graph(7, 20))
    assert model.embed.out_features == HIDDEN


class SmallContractions(nn.Module):
    """A matrix times a vector parameter, ``addmm`` with its own ``beta``, and a split the code calls
    ``unsafe_split``, all on the features a linear layer makes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(F_IN, HIDDEN)
        self.scores = nn.Parameter(torch.randn(HIDDEN))
        self.mix, self.shift = nn.Parameter(torch.randn(HIDDEN, HIDDEN)), nn.Parameter(torch.randn(HIDDEN))
        self.left, self.right = nn.Linear(HIDDEN // 2, 3), nn.Linear(HIDDEN // 2, 3)

    def forward(self, x):
        h = torch.relu(self.embed(x))
        score = torch.mv(h.reshape(-1, h.shape[-1]), self.scores).reshape(h.shape[:-1])
        mixed = torch.addmm(self.shift, h, self.mix, beta=0.5, alpha=2.0)  # beta scales the shift
        first, second = mixed.unsafe_split(mixed.shape[-1] // 2, dim=-1)
        return self.left(first) * self.right(second) + score[:, None]


def test_matrix_vector_products_a_scaled_bias_and_unsafe_splits_lose_their_masked_entries():
    """``mv`` and ``unsafe_split`` were barriers. ``addmm``'s constants of removed columns were its
    bias without ``beta``: folding them left the output off by 0.5 (a VerificationError)."""
    torch.manual_seed(0)
    model = SmallContractions().eval()
    masks = {"embed": {"weight": rows(KEEP, (HIDDEN, F_IN)), "bias": KEEP},
             "": {"mix": KEEP[None, :].expand(HIDDEN, HIDDEN)}}  # the shift stays: constant columns
    report = check_speedup(model, masks, torch.randn(2, F_IN), torch.randn(5, F_IN),
                           shrunk=["embed.weight", "scores", "mix"])
    assert model.mix.shape == (HIDDEN // 2, HIDDEN // 2) and model.shift.shape == (HIDDEN // 2,)
    assert not report.barriers
