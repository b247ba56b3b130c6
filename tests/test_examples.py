"""The seed-table examples run end to end (quick mode, CPU): pruning, speedup, equality, table, plot.

The examples are scripts, not a package; they import their harness as a sibling module, so the
examples folder goes on ``sys.path`` for these tests. Quick mode times 1 and 2 forwards of a batch of
8 once: it measures nothing meaningful, only that every step works.
"""

import importlib
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["slim_vgg_cifar", "fpgm_lenet_mnist", "l1filter_vgg_cifar", "apoz_vgg_cifar"]


@pytest.fixture
def one_thread():
    """Runs torch on one thread for the test, then puts the count back.

    On a 2-core machine with another process busy, torch's threads wait on each other: the quick
    runs took 15 s each instead of 2 s. Quick mode measures nothing, so one thread loses nothing.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_and_shrinks(script, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    example = importlib.import_module(script)

    table = example.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])

    assert table.max_abs_diff < 1e-4  # main raises first if the outputs differ
    assert table.params_after < table.params_before
    assert table.flops_after < table.flops_before
    assert [row.times for row in table.rows] == [1, 2]
    assert table.png.parent == tmp_path and table.png.stat().st_size > 0
    assert table.json.exists()
    assert "|Times| Mask Latency| Speedup Latency |" in capsys.readouterr().out
