"""Recurrent layers (nn.LSTM, nn.GRU, nn.RNN) read their input features through the first layer's
input weights: removed features go from them (constants folded into its input bias), and the
layer's outputs are the masked model's."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from support.checks import check_speedup, rows

MASKED = torch.tensor([False, True, False, True, True, False, False, True])
ZERO = torch.tensor([False, True, False, False, True, False, False, False])  # the other masked ones hold a bias


class Sequence(nn.Module):
    """A conv over (N, C, L) feeding a recurrent layer, which is given initial states or not."""

    def __init__(self, rnn: nn.RNNBase, states: bool = False):
        super().__init__()
        self.a, self.rnn, self.states = nn.Conv1d(4, 8, 3, padding=1), rnn, states
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 3)

    def forward(self, x):
        y = self.a(x)
        y = y.permute(0, 2, 1) if self.rnn.batch_first else y.permute(2, 0, 1)
        if not self.states:
            out, _ = self.rnn(y)
        else:
            h = torch.full((self.rnn.num_layers * (2 if self.rnn.bidirectional else 1), x.shape[0], self.rnn.hidden_size), 0.1)
            out, _ = self.rnn(y, (h, h) if isinstance(self.rnn, nn.LSTM) else h)
        return self.head(out)


def masks():
    return {"a": {"weight": rows(~MASKED, (8, 4, 3)), "bias": ~ZERO}}


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("batch_first, bidirectional, states", [(False, False, False), (True, True, True)])
@pytest.mark.parametrize("bias", [True, False])
def test_removed_input_features_go_from_the_first_layer(kind, batch_first, bidirectional, states, bias):
    rnn = kind(8, 6, num_layers=2, batch_first=batch_first, bidirectional=bidirectional, bias=bias)
    model = Sequence(rnn, states).eval()
    report = check_speedup(model, masks(), torch.randn(2, 4, 5), torch.randn(3, 4, 7),
                           shrunk=["a.weight", "rnn.weight_ih_l0"] + (["rnn.weight_ih_l0_reverse"] if bidirectional else []))
    assert not report.barriers
    # With biases, the channels holding one are folded into the input bias; without, only zeros go.
    assert model.a.out_channels == model.rnn.input_size == (4 if bias else 6)
    assert model.rnn.weight_ih_l1.shape == rnn.weight_ih_l1.shape  # the layers after the first keep theirs
    # The user's layer is left as it was (the sped-up one is a copy with its own weight list).
    assert rnn.input_size == 8 and all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, rnn._flat_weights_names))


def test_an_unbatched_sequence():
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.rnn = nn.Linear(4, 8), nn.LSTM(8, 5)

        def forward(self, x):  # (L, 4)
            return self.rnn(self.a(x))[0]

    model = Unbatched().eval()
    check_speedup(model, {"a": {"weight": rows(~MASKED, (8, 4)), "bias": ~ZERO}}, torch.randn(6, 4), torch.randn(9, 4),
                  shrunk=["a.weight", "rnn.weight_ih_l0"])


class Packed(nn.Module):
    """A linear layer feeding a recurrent one through ``pack_padded_sequence`` (lengths given with
    the input, unsorted), unpacked again for the head."""

    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        self.a, self.rnn = nn.Linear(4, 8), rnn
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 3)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(self.a(x), lengths, batch_first=self.rnn.batch_first, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=self.rnn.batch_first,
                                     total_length=x.shape[1 if self.rnn.batch_first else 0])
        return self.head(out)


@pytest.mark.parametrize("kind, batch_first, bidirectional", [(nn.GRU, True, False), (nn.LSTM, False, True)])
def test_a_packed_sequence_loses_the_features_its_rows_lose(kind, batch_first, bidirectional):
    """``_pack_padded_sequence`` was a barrier, and a recurrent layer given a packed sequence kept
    every input feature."""
    rnn = kind(8, 5, batch_first=batch_first, bidirectional=bidirectional)
    model = Packed(rnn).eval()
    masks = {"a": {"weight": rows(~MASKED, (8, 4)), "bias": ~ZERO}}
    dummy, fresh = torch.randn(2, 5, 4), torch.randn(3, 6, 4)
    if not batch_first:
        dummy, fresh = dummy.transpose(0, 1), fresh.transpose(0, 1)
    report = check_speedup(model, masks, (dummy, torch.tensor([3, 5])), (fresh, torch.tensor([6, 2, 4])),
                           shrunk=["a.weight", "rnn.weight_ih_l0"])
    assert model.rnn.input_size == 4 and not report.barriers  # the channels holding a bias are folded


class ScanFromZeros(nn.Module):
    """A diagonal recurrence written in Python (Mamba's and RWKV's scans), its state started as
    ``torch.zeros`` of sizes read from the input, or written in the code."""

    def __init__(self, literal: bool = False):
        super().__init__()
        self.literal = literal
        self.enc, self.dec = nn.Linear(6, 16), nn.Linear(16, 3)
        self.decay = nn.Parameter(torch.rand(16) * 0.9)

    def forward(self, x):
        u = self.enc(x)
        h = torch.zeros(u.shape[0], 16 if self.literal else u.shape[2])
        states = []
        for t in range(u.shape[1]):
            h = self.decay * h + u[:, t]
            states.append(h)
        return self.dec(torch.stack(states, 1))


@pytest.mark.parametrize("literal", [False, True], ids=["sizes read", "sizes written"])
def test_a_state_made_of_zeros_loses_the_channels_of_what_it_meets(literal):
    """Made from nothing, the state kept its size and every channel of the recurrence (708 parameters
    stayed 708); a size written in the code makes another shape than planned, which the verification
    finds, keeping the state's size."""
    torch.manual_seed(0)
    model = ScanFromZeros(literal).eval()
    keep = torch.arange(16) % 2 == 1
    masks = {"enc": {"weight": rows(keep, (16, 6)), "bias": keep}}
    report = check_speedup(model, masks, torch.randn(2, 5, 6), torch.randn(3, 7, 6),
                           shrunk=[] if literal else ["enc.weight", "decay", "dec.weight"])
    assert model.enc.out_features == (16 if literal else 8)
    assert bool(report.kept_for_verification) == literal
