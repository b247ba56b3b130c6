"""speedup's plugin system, tested the way users meet it: installed distributions and entry points.

The plugin distributions in ``tests/plugin_fixtures/`` are installed with pip into temporary
directories, once per session. Checks that must see a given set of installed plugins run in a
fresh Python process whose ``PYTHONPATH`` holds exactly those directories, so the plugins of the
test process itself never change. The in-process tests that need the example plugin put its
directory on ``sys.path`` for the duration of the test and reset speedup's plugin cache before and
after (``plugins_on_path``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import speedup
from speedup.modules import ChannelGather
from speedup.plugins import manager
from speedup.plugins.registry import CORE_DISTRIBUTION, Provider, RuleRegistry
from speedup.rule import ModuleRule
from support.checks import check_speedup, keep_mask, output_channel_masks, rows

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "plugin_fixtures"
EXAMPLE, BROKEN, CONFLICT = "speedup-plugin-example", "speedup-plugin-broken", "speedup-plugin-conflict"
VERSIONS = {EXAMPLE: "0.1.0", BROKEN: "0.1.0", CONFLICT: "0.2.0"}
FIXTURE_PACKAGES = ("speedup_example", "speedup_broken", "speedup_conflict")
SUBPROCESS_TIMEOUT = 300


# -- installing fixture distributions and running Python with them -------------------------------


def _env(paths=(), **extra: str) -> dict:
    """The environment of a child process that sees exactly ``paths`` besides the venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPEEDUP_STRICT_PLUGINS")}
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


def _pip_install(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Installs fixture distribution ``name`` into a fresh directory and returns that directory.

    The source is copied first: building in place would leave ``build/`` and ``*.egg-info`` in
    the fixture folder (and an ``*.egg-info`` on a path makes a distribution visible by itself).
    """
    work = tmp_path_factory.mktemp(name)
    source, target = work / "source", work / "site"
    shutil.copytree(FIXTURES / name, source, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"))
    command = [
        sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
        "--disable-pip-version-check", "--no-input", "--quiet", "--target", str(target), str(source),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=work, env=_env(), timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, f"pip could not install {name}:\n{result.stdout}\n{result.stderr}"
    dist_info = target / f"{name.replace('-', '_')}-{VERSIONS[name]}.dist-info"
    assert (dist_info / "entry_points.txt").is_file(), f"pip left no entry points for {name}: {sorted(os.listdir(target))}"
    return target


@pytest.fixture(scope="session")
def example_site(tmp_path_factory) -> Path:
    return _pip_install(EXAMPLE, tmp_path_factory)


@pytest.fixture(scope="session")
def broken_site(tmp_path_factory) -> Path:
    return _pip_install(BROKEN, tmp_path_factory)


@pytest.fixture(scope="session")
def conflict_site(tmp_path_factory) -> Path:
    return _pip_install(CONFLICT, tmp_path_factory)


@pytest.fixture(scope="session")
def example_source_only(tmp_path_factory) -> Path:
    """A directory where ``speedup_example`` is importable but not installed: no distribution, no entry point."""
    root = tmp_path_factory.mktemp("example-source-only")
    shutil.copytree(FIXTURES / EXAMPLE / "src" / "speedup_example", root / "speedup_example",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _run(args: list, cwd: Path, paths=(), **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=_env(paths, **env),
                          timeout=SUBPROCESS_TIMEOUT)


def run_python(code, cwd: Path, paths=(), **env: str) -> dict:
    """Runs ``code`` (a string, or a tuple of strings each dedented on its own) in a fresh interpreter.

    Returns the JSON it printed after ``RESULT:``. ``tests/`` is always on the path, so the code can
    use ``support.checks``.
    """
    parts = (code,) if isinstance(code, str) else code
    source = "\n".join(textwrap.dedent(part) for part in parts)
    result = _run([sys.executable, "-c", source], cwd, [*paths, TESTS], **env)
    assert result.returncode == 0, f"the child process failed:\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT:")]
    assert lines, f"the child process printed no result:\n{result.stdout}\n{result.stderr}"
    return json.loads(lines[-1][len("RESULT:"):])


def run_cli(cwd: Path, paths=(), *options: str, **env: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "speedup.cli", "plugins", *options], cwd, paths, **env)


def _forget_fixture_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in FIXTURE_PACKAGES:
            del sys.modules[name]


@pytest.fixture
def plugins_on_path(monkeypatch):
    """Returns a function that puts directories on ``sys.path`` and makes speedup rescan its plugins."""
    _forget_fixture_modules()
    manager.reset()

    def use(*paths: Path) -> None:
        for path in paths:
            monkeypatch.syspath_prepend(str(path))
        importlib.invalidate_caches()
        manager.reset()

    yield use
    manager.reset()
    _forget_fixture_modules()


# -- models ----------------------------------------------------------------------------------------

MODEL_CODE = """
import torch
from torch import nn
from speedup_example import ScaledLinear

def scaled_mlp(last_bias=True):
    torch.manual_seed(0)
    net = nn.Sequential(ScaledLinear(8, 16), nn.ReLU(), ScaledLinear(16, 12), nn.Tanh(),
                        ScaledLinear(12, 4, bias=last_bias))
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, ScaledLinear):
                layer.scale.uniform_(0.5, 2.0)
    return net
"""


def scaled_mlp(last_bias: bool = True) -> nn.Sequential:
    """``MODEL_CODE``'s model, in this process (``speedup_example`` must be importable)."""
    namespace: dict = {}
    exec(MODEL_CODE, namespace)
    return namespace["scaled_mlp"](last_bias)


# -- the example plugin, installed -----------------------------------------------------------------


def test_example_plugin_is_discovered_through_its_entry_point(example_site, tmp_path):
    result = run_python(
        """
        import dataclasses, importlib.metadata, json
        from speedup.plugins.manager import load_plugins
        import speedup_example
        from speedup_example import ScaledLinear, ScaledLinearRule

        class PlainSubclass(ScaledLinear):
            pass

        loaded = load_plugins()
        entry = loaded.registry.provider_of(ScaledLinear)
        print("RESULT:" + json.dumps({
            "plugins": [dataclasses.asdict(info) for info in loaded.plugins],
            "rule": type(loaded.registry.module_rule(ScaledLinear(2, 3))).__name__,
            "provider": [entry.distribution, entry.version] if entry else None,
            "subclass_rule": repr(loaded.registry.module_rule(PlainSubclass(2, 3))),
            "module_file": speedup_example.__file__,
            "entry_points": [[ep.name, ep.value, ep.dist.metadata["Name"]]
                             for ep in importlib.metadata.entry_points(group="speedup")],
        }))
        """,
        tmp_path,
        [example_site],
    )
    assert ["example", "speedup_example", EXAMPLE] in result["entry_points"]
    assert result["module_file"].startswith(str(example_site))
    infos = [p for p in result["plugins"] if p["distribution"] == EXAMPLE]
    assert len(infos) == 1, result["plugins"]
    info = infos[0]
    assert info["name"] == "example" and info["target"] == "speedup_example"
    assert info["version"] == "0.1.0"
    assert info["error"] is None
    assert info["modules"] == ["speedup_example.modules.ScaledLinear"] and info["ops"] == []
    assert result["rule"] == "ScaledLinearRule"
    assert result["provider"] == [EXAMPLE, "0.1.0"]
    # The rule does not set ``subclasses``: a subclass of ScaledLinear is not claimed.
    assert result["subclass_rule"] == "None"
    # Core still loads first, and the example plugin does not disturb the other plugins.
    assert result["plugins"][0]["distribution"] == CORE_DISTRIBUTION
    assert all(p["error"] is None for p in result["plugins"]), result["plugins"]


def test_example_plugin_speeds_up_scaled_linear_layers(example_site, tmp_path):
    result = run_python(
        (MODEL_CODE, """
        import json
        from support.checks import check_speedup, keep_mask, rows

        g = torch.Generator().manual_seed(1)
        keep0, keep2, keep_scale = keep_mask(16, 0.5, g), keep_mask(12, 0.5, g), keep_mask(12, 0.5, g)
        cases = {
            # Masked rows (weight and bias) of layer 0 are zero outputs; masked weight rows of layer 2
            # leave tanh(bias * scale), non-zero constants that layer 4 folds into its bias.
            "rows": ({"0": {"weight": rows(keep0, (16, 8)), "bias": keep0}, "2": {"weight": rows(keep2, (12, 16))}}, True),
            # A masked scale entry makes its output feature a constant 0, whatever the weights.
            "scale": ({"2": {"scale": keep_scale}}, True),
            # The folded constants need a bias on a layer that had none.
            "no-bias": ({"2": {"weight": rows(keep2, (12, 16))}}, False),
        }
        shrunk = {
            "rows": ["0.weight", "0.bias", "0.scale", "2.weight", "2.bias", "2.scale", "4.weight"],
            "scale": ["2.weight", "2.bias", "2.scale", "4.weight"],
            "no-bias": ["2.weight", "2.bias", "2.scale", "4.weight"],
        }
        out = {}
        for name, (masks, last_bias) in cases.items():
            net = scaled_mlp(last_bias)
            report = check_speedup(net, masks, torch.randn(3, 5, 8), torch.randn(7, 5, 8), shrunk=shrunk[name],
                                   max_param_ratio=0.8)
            out[name] = {
                "types": [type(layer).__name__ for layer in net],
                "features": [[layer.in_features, layer.out_features] for layer in net if isinstance(layer, ScaledLinear)],
                "rebuilt": {k: v[0] for k, v in report.modules.items()},
                "last_bias": None if net[4].bias is None else list(net[4].bias.shape),
                "params": [report.params_before, report.params_after],
            }
        out["kept"] = [int(keep0.sum()), int(keep2.sum()), int(keep_scale.sum())]
        print("RESULT:" + json.dumps(out))
        """),
        tmp_path,
        [example_site],
    )
    kept0, kept2, kept_scale = result["kept"]
    for name in ("rows", "scale", "no-bias"):
        case = result[name]
        # check_speedup compared with the masked model on a fresh input and checked the shrinking;
        # here: the layers were rebuilt by the plugin's rule, as ScaledLinear layers.
        assert case["types"] == ["ScaledLinear", "ReLU", "ScaledLinear", "Tanh", "ScaledLinear"], case
        assert set(case["rebuilt"].values()) == {"ScaledLinear"}, case
        assert case["params"][1] < case["params"][0], case
    assert result["rows"]["features"] == [[8, kept0], [kept0, kept2], [kept2, 4]]
    assert result["scale"]["features"] == [[8, 16], [16, kept_scale], [kept_scale, 4]]
    assert result["no-bias"]["features"] == [[8, 16], [16, kept2], [kept2, 4]]
    assert result["no-bias"]["last_bias"] == [4], "the removed constants must be folded into a new bias"


def test_cli_lists_the_example_plugin_only_when_it_is_installed(example_site, tmp_path):
    installed = run_cli(tmp_path, [example_site], "-v")
    absent = run_cli(tmp_path, [], "-v")
    assert installed.returncode == 0, installed.stderr
    assert absent.returncode == 0, absent.stderr
    lines = installed.stdout.splitlines()
    header = f"{EXAMPLE} 0.1.0  [example = speedup_example]  ok"
    assert header in lines, installed.stdout
    start = lines.index(header)
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    assert lines[start + 1:end] == ["  1 module types, 0 operators", "    module speedup_example.modules.ScaledLinear"], installed.stdout
    assert EXAMPLE not in absent.stdout
    assert "module ScaledLinear" not in absent.stdout
    # Everything else is listed the same way in both states.
    assert lines[:start] + lines[end:] == absent.stdout.splitlines()


def test_importable_but_not_installed_module_is_not_claimed(example_source_only, tmp_path):
    """Rules come from installed distributions' entry points, not from whatever is importable."""
    result = run_python(
        """
        import json
        from speedup.plugins.manager import load_plugins
        from speedup_example import ScaledLinear

        loaded = load_plugins()
        print("RESULT:" + json.dumps({
            "rule": repr(loaded.registry.module_rule(ScaledLinear(2, 3))),
            "distributions": [info.distribution for info in loaded.plugins],
        }))
        """,
        tmp_path,
        [example_source_only],
    )
    assert result["rule"] == "None"
    assert EXAMPLE not in result["distributions"]


# -- a plugin that fails to load -------------------------------------------------------------------


def test_broken_plugin_is_reported_and_the_others_still_load(example_site, broken_site, tmp_path):
    result = run_python(
        """
        import json, warnings
        import torch
        import speedup
        from speedup.plugins.manager import load_plugins
        from speedup_example import ScaledLinear

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load_plugins()
        out = {
            "warnings": [str(w.message) for w in caught],
            "plugins": {info.name: [info.distribution, info.version, info.ok, info.error, info.modules]
                        for info in loaded.plugins},
            "example_rule": type(loaded.registry.module_rule(ScaledLinear(2, 3))).__name__,
            "linear_rule": type(loaded.registry.module_rule(torch.nn.Linear(2, 3))).__name__,
        }
        try:
            load_plugins(strict=True)
        except speedup.PluginLoadError as exc:
            out["strict"] = str(exc)
        else:
            out["strict"] = None
        print("RESULT:" + json.dumps(out))
        """,
        tmp_path,
        [example_site, broken_site],
    )
    relevant = [w for w in result["warnings"] if "broken" in w]
    assert len(relevant) == 1, result["warnings"]
    warning = relevant[0]
    assert "'broken'" in warning and f"{BROKEN} 0.1.0" in warning, warning
    assert "ImportError" in warning and "fails on purpose" in warning, warning
    distribution, version, ok, error, modules = result["plugins"]["broken"]
    assert (distribution, version, ok) == (BROKEN, "0.1.0", False)
    assert error.startswith("ImportError")
    assert result["plugins"]["example"][:3] == [EXAMPLE, "0.1.0", True]
    assert result["plugins"]["example"][4] == ["speedup_example.modules.ScaledLinear"]
    assert result["plugins"]["torch"][2] is True
    assert result["example_rule"] == "ScaledLinearRule"
    assert result["linear_rule"] == "LinearRule"
    assert result["strict"] is not None, "load_plugins(strict=True) did not raise PluginLoadError"
    assert "'broken'" in result["strict"] and f"{BROKEN} 0.1.0" in result["strict"]


def test_strict_plugins_environment_variable_turns_a_broken_plugin_into_an_error(example_site, broken_site, tmp_path):
    result = run_python(
        """
        import json
        import torch
        import speedup
        from speedup.plugins.manager import load_plugins

        def outcome(call):
            try:
                call()
            except speedup.PluginLoadError as exc:
                return str(exc)
            return None

        model = torch.nn.Linear(4, 3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = {
            "load": outcome(lambda: load_plugins()),
            "shrink": outcome(lambda: speedup.shrink(model, {"": {"weight": torch.ones(3, 4)}}, torch.randn(2, 4))),
            "explicit": outcome(lambda: load_plugins(strict=False)),
            "unchanged": all(torch.equal(before[k], v) for k, v in model.state_dict().items()),
        }
        print("RESULT:" + json.dumps(out))
        """,
        tmp_path,
        [example_site, broken_site],
        SPEEDUP_STRICT_PLUGINS="1",
    )
    assert result["load"] is not None and f"{BROKEN} 0.1.0" in result["load"], result
    assert result["shrink"] is not None and f"{BROKEN} 0.1.0" in result["shrink"], result
    assert result["explicit"] is None, "strict=False must override SPEEDUP_STRICT_PLUGINS"
    assert result["unchanged"]


def test_cli_strict_reports_the_broken_plugin_and_fails(example_site, broken_site, tmp_path):
    run = run_cli(tmp_path, [example_site, broken_site], "--strict")
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    failed = [line for line in lines if line.startswith(f"{BROKEN} 0.1.0  [broken = speedup_broken]  FAILED: ImportError")]
    assert len(failed) == 1, run.stdout
    assert f"{EXAMPLE} 0.1.0  [example = speedup_example]  ok" in lines, run.stdout


# -- two plugins claiming the same module type -----------------------------------------------------

CONFLICT_SETUP = """
import json
import speedup
from support.checks import output_channel_masks

net = scaled_mlp()
masks = output_channel_masks(net, ["0", "2"])
"""


def test_conflicting_plugins_are_an_error_naming_both_distributions(example_site, conflict_site, tmp_path):
    result = run_python(
        (MODEL_CODE, CONFLICT_SETUP, """
        before = {k: v.clone() for k, v in net.state_dict().items()}
        try:
            speedup.shrink(net, masks, torch.randn(3, 8))
        except speedup.PluginConflictError as exc:
            error = str(exc)
        else:
            error = None
        unchanged = all(torch.equal(before[k], v) for k, v in net.state_dict().items())
        print("RESULT:" + json.dumps({"error": error, "unchanged": unchanged}))
        """),
        tmp_path,
        [example_site, conflict_site],
    )
    error = result["error"]
    assert error is not None, "two plugins claiming ScaledLinear did not raise PluginConflictError"
    assert f"{EXAMPLE} 0.1.0" in error and f"{CONFLICT} 0.2.0" in error, error
    assert "ScaledLinear" in error
    assert result["unchanged"]


def test_conflict_is_resolved_per_call_with_customized_replace_func(example_site, conflict_site, tmp_path):
    """The conflict error says "choose per call with customized_replace_func"; doing so must work."""
    result = run_python(
        (MODEL_CODE, CONFLICT_SETUP, """
        from support.checks import check_speedup

        calls = []

        def replace(module, seed_masks):
            calls.append(type(module).__name__)
            _, _, weights = seed_masks
            keep_rows, keep_cols = weights["weight"].amax(1) > 0, weights["weight"].amax(0) > 0
            new = ScaledLinear(int(keep_cols.sum()), int(keep_rows.sum()), bias=module.bias is not None)
            with torch.no_grad():
                new.weight.copy_(module.weight[keep_rows][:, keep_cols])
                new.scale.copy_(module.scale[keep_rows])
                if module.bias is not None:
                    new.bias.copy_(module.bias[keep_rows])
            return new

        check_speedup(net, masks, torch.randn(3, 8), torch.randn(6, 8), shrunk=["0.weight", "2.weight", "4.weight"],
                      customized_replace_func={ScaledLinear: replace})
        print("RESULT:" + json.dumps({"calls": calls}))
        """),
        tmp_path,
        [example_site, conflict_site],
    )
    assert result["calls"] == ["ScaledLinear"] * 3


def test_cli_reports_a_conflict_instead_of_crashing(example_site, conflict_site, tmp_path):
    """``speedup plugins`` is where a user looks when plugins conflict: it must say so, not print a traceback."""
    run = run_cli(tmp_path, [example_site, conflict_site], "-v")
    output = run.stdout + run.stderr
    assert "Traceback" not in run.stderr, output
    assert f"{EXAMPLE} 0.1.0" in output and f"{CONFLICT} 0.2.0" in output, output
    assert "ScaledLinear" in output


# -- customized_replace_func overrides every plugin ------------------------------------------------


def _replace_scaled_linear(ScaledLinear, calls: list):
    """A user's replacement function for ScaledLinear, recording what it was given."""

    def replace(module, masks):
        calls.append((module, masks))
        input_masks, output_mask, weight_masks = masks
        keep_rows = weight_masks["weight"].amax(1) > 0
        keep_cols = weight_masks["weight"].amax(0) > 0
        new = ScaledLinear(int(keep_cols.sum()), int(keep_rows.sum()), bias=module.bias is not None)
        with torch.no_grad():
            new.weight.copy_(module.weight[keep_rows][:, keep_cols])
            new.scale.copy_(module.scale[keep_rows])
            if module.bias is not None:
                new.bias.copy_(module.bias[keep_rows])
        return new

    return replace


@pytest.mark.parametrize("installed", [True, False], ids=["plugin-installed", "no-plugin"])
@pytest.mark.parametrize("key", ["class", "name", "qualified-name"])
def test_customized_replace_func_overrides_the_plugin(key, installed, plugins_on_path, example_site,
                                                      example_source_only, monkeypatch):
    plugins_on_path(example_site if installed else example_source_only)
    import speedup_example
    from speedup_example import ScaledLinear, ScaledLinearRule

    rule = manager.loaded_plugins().registry.module_rule(ScaledLinear(2, 3))
    assert isinstance(rule, ScaledLinearRule) if installed else rule is None
    plugin_replacements = []
    original = ScaledLinearRule.replace
    monkeypatch.setattr(ScaledLinearRule, "replace",
                        lambda self, module, plan: plugin_replacements.append(module) or original(self, module, plan))

    net = scaled_mlp()
    originals = [net[0], net[2], net[4]]
    calls: list = []
    custom = {"class": ScaledLinear, "name": "ScaledLinear",
              "qualified-name": "speedup_example.modules.ScaledLinear"}[key]
    masks = output_channel_masks(net, ["0", "2"], keep=0.5, seed=3)
    check_speedup(net, masks, torch.randn(3, 8), torch.randn(6, 8), shrunk=["0.weight", "2.weight", "4.weight"],
                  max_param_ratio=0.6,
                  customized_replace_func={custom: _replace_scaled_linear(ScaledLinear, calls)})

    assert plugin_replacements == [], "the plugin's rule rebuilt a module that customized_replace_func covers"
    # Called once per changed ScaledLinear, with the original module; what it returned is in the model.
    assert [id(module) for module, _ in calls] == [id(m) for m in originals]
    for (module, masks_given), new in zip(calls, [net[0], net[2], net[4]]):
        assert isinstance(masks_given, tuple) and len(masks_given) == 3
        input_masks, output_mask, weight_masks = masks_given
        assert type(new) is ScaledLinear and new is not module
        assert len(input_masks) == 1 and input_masks[0].shape == (3, module.in_features)
        assert output_mask.shape == (3, module.out_features)
        assert set(weight_masks) == {"weight", "bias", "scale"}
        assert weight_masks["weight"].shape == module.weight.shape
        kept_out = weight_masks["weight"].amax(1) > 0
        kept_in = weight_masks["weight"].amax(0) > 0
        # The four views of the kept entries agree with one another and with the result.
        assert torch.equal(output_mask > 0, kept_out.expand(3, -1))
        assert torch.equal(input_masks[0] > 0, kept_in.expand(3, -1))
        assert torch.equal(weight_masks["scale"] > 0, kept_out)
        assert torch.equal(weight_masks["bias"] > 0, kept_out)
        assert (new.out_features, new.in_features) == (int(kept_out.sum()), int(kept_in.sum()))
    assert speedup_example.__file__.startswith(str(example_site if installed else example_source_only))


def test_customized_replace_func_overrides_a_core_rule():
    """Core's rules are a plugin like any other: a user's function replaces nn.Linear for that call only."""
    torch.manual_seed(0)
    calls = []

    def replace(module, masks):
        calls.append(module)
        _, _, weights = masks
        keep_rows, keep_cols = weights["weight"].amax(1) > 0, weights["weight"].amax(0) > 0
        new = nn.Linear(int(keep_cols.sum()), int(keep_rows.sum()))
        with torch.no_grad():
            new.weight.copy_(module.weight[keep_rows][:, keep_cols])
            new.bias.copy_(module.bias[keep_rows])
        return new

    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    masks = output_channel_masks(net, ["0"])
    check_speedup(net, masks, torch.randn(2, 6), torch.randn(5, 6), shrunk=["0.weight", "2.weight"],
                  customized_replace_func={"Linear": replace})
    assert len(calls) == 2 and all(type(module) is nn.Linear for module in calls)
    # For that call only: the registry still holds core's rule.
    assert type(manager.loaded_plugins().registry.module_rule(nn.Linear(2, 2))).__name__ == "LinearRule"


# -- core's own rules are a plugin -----------------------------------------------------------------


def test_core_rules_are_loaded_through_the_torch_entry_point_of_speedup_core():
    core_eps = [ep for ep in importlib.metadata.entry_points(group="speedup") if ep.name == "torch"]
    assert [(ep.value, ep.dist.metadata["Name"]) for ep in core_eps] == [("speedup.rules", CORE_DISTRIBUTION)]

    loaded = manager.load_plugins()
    core = [info for info in loaded.plugins if info.distribution == CORE_DISTRIBUTION]
    assert len(core) == 1, loaded.plugins
    info = core[0]
    assert loaded.plugins[0] is info, "core's rules must load first, so that plugins can override them"
    assert (info.name, info.target) == ("torch", "speedup.rules")
    # Loaded from the installed distribution's entry point, not the source-tree fallback.
    assert info.version == importlib.metadata.version(CORE_DISTRIBUTION) != "source"
    assert info.ok, info.error
    assert {"Linear", "Conv2d", "BatchNorm2d", "LayerNorm"} <= {name.rpartition(".")[2] for name in info.modules}
    assert {"aten.relu", "aten.add", "aten.mm"} <= set(info.ops)
    assert loaded.registry.provider_of(nn.Linear) == Provider(CORE_DISTRIBUTION, info.version)


def test_a_plugin_rule_replaces_the_core_rule_for_the_same_type():
    class MyLinearRule(ModuleRule):
        pass

    rule = MyLinearRule()
    plugin = types.ModuleType("my_linear_plugin")
    plugin.speedup_register_rules = speedup.hookimpl(lambda registry: registry.add_module(nn.Linear, rule))
    loaded = manager.load_plugins(extra=[plugin])
    assert loaded.registry.module_rule(nn.Linear(2, 2)) is rule
    assert loaded.plugins[-1].modules == ["torch.nn.modules.linear.Linear"] and loaded.plugins[-1].ok
    assert loaded.registry.provider_of(nn.Linear).distribution == "my_linear_plugin"


def test_a_plugin_failing_during_registration_leaves_no_partial_rules():
    class Claimed(nn.Module):
        def forward(self, x):
            return x

    def register(registry):
        registry.add_module(Claimed, ModuleRule())
        raise RuntimeError("half-way")

    plugin = types.ModuleType("half_registered_plugin")
    plugin.speedup_register_rules = speedup.hookimpl(register)
    with pytest.warns(UserWarning, match="half_registered_plugin.*RuntimeError: half-way"):
        loaded = manager.load_plugins(extra=[plugin])
    assert loaded.registry.module_rule(Claimed()) is None
    assert not loaded.plugins[-1].ok
    with pytest.raises(speedup.PluginLoadError, match="half_registered_plugin"):
        manager.load_plugins(strict=True, extra=[plugin])


# -- registry lookup -------------------------------------------------------------------------------


class Base(nn.Module):
    def forward(self, x):
        return x * 2


class PlainSubclass(Base):
    """Inherits forward."""


class BelowPlainSubclass(PlainSubclass):
    """Inherits forward, two levels down."""


class OverridesForward(Base):
    def forward(self, x):
        return x * 3


class BelowOverride(OverridesForward):
    """Inherits an overridden forward."""


class ForwardMixin:
    def forward(self, x):
        return x + 1


class MixedIn(ForwardMixin, Base):
    """Gets forward from a mixin that comes before the registered base."""


def _rule(subclasses: bool) -> ModuleRule:
    rule = ModuleRule()
    rule.subclasses = subclasses
    return rule


def test_registry_matches_the_exact_type_by_default():
    registry, rule = RuleRegistry(), _rule(subclasses=False)
    registry.add_module(Base, rule)
    assert registry.module_rule(Base()) is rule
    for kind in (PlainSubclass, BelowPlainSubclass, OverridesForward, BelowOverride, MixedIn):
        assert registry.module_rule(kind()) is None, kind.__name__


def test_registry_claims_subclasses_that_keep_forward_only_if_the_rule_asks():
    registry, rule = RuleRegistry(), _rule(subclasses=True)
    registry.add_module(Base, rule)
    assert registry.module_rule(Base()) is rule
    assert registry.module_rule(PlainSubclass()) is rule
    assert registry.module_rule(BelowPlainSubclass()) is rule
    for kind in (OverridesForward, BelowOverride, MixedIn):
        assert registry.module_rule(kind()) is None, f"{kind.__name__} computes something else; it must not be claimed"


def test_registry_prefers_a_rule_registered_for_the_subclass_itself():
    registry, base_rule, own_rule = RuleRegistry(), _rule(subclasses=True), _rule(subclasses=False)
    registry.add_module(Base, base_rule)
    registry.add_module(OverridesForward, own_rule)
    assert registry.module_rule(OverridesForward()) is own_rule
    assert registry.module_rule(BelowOverride()) is None
    assert registry.module_rule(PlainSubclass()) is base_rule


def test_registry_size_functions_apply_to_subclasses_and_reject_what_is_not_callable():
    registry = RuleRegistry()
    sizes = lambda module: {"width": 1}  # noqa: E731
    registry.add_sizes(f"{Base.__module__}.{Base.__qualname__}", sizes)
    assert registry.size_attributes(Base()) is sizes
    assert registry.size_attributes(OverridesForward()) is sizes
    assert registry.size_attributes(nn.Linear(1, 1)) is None
    with pytest.raises(TypeError, match="function of the module"):
        registry.add_sizes(Base, 3)
    with pytest.raises(TypeError, match="module path"):
        registry.add_sizes("Base", sizes)


class StoredWidth(nn.Module):
    """Traced through, but reshapes with a stored width that must follow ``up.out_features``."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 2)
        self.width = 8

    def forward(self, x):
        return self.down(torch.relu(self.up(x)).reshape(-1, self.width))


def _with_sizes(monkeypatch, sizes) -> None:
    plugin = types.ModuleType("stored_width_plugin")
    plugin.speedup_register_rules = speedup.hookimpl(lambda registry: registry.add_sizes(StoredWidth, sizes))
    monkeypatch.setattr(manager, "_loaded", manager.load_plugins(extra=[plugin]))


def test_size_attributes_follow_the_shrunk_parts(monkeypatch):
    _with_sizes(monkeypatch, lambda m: {"width": m.up.out_features})
    model = StoredWidth()
    masks = {"up": {"weight": rows(keep_mask(8), (8, 4))}}
    report = check_speedup(model, masks, torch.randn(3, 4), torch.randn(5, 4), shrunk=["up.weight"])
    assert model.width == 4 and report.attributes == {"width": (8, 4)}
    assert "(attribute)" in report.table()


def test_a_wrong_size_function_costs_the_pruning_never_the_outputs(monkeypatch):
    """Verification finds the first call that failed: the width read in the model's own forward is then
    set from the dimensions that shrank, as for any stored size, and the plugin's wrong value is gone."""
    _with_sizes(monkeypatch, lambda m: {"width": 3})
    model = StoredWidth()
    report = check_speedup(model, {"up": {"weight": rows(keep_mask(8), (8, 4))}}, torch.randn(3, 4),
                           torch.randn(5, 4))
    assert model.width == model.up.out_features == 4 and report.attributes == {"width": (8, 4)}


class Memory:
    """Stands for a key/value cache: returned by the model only to be passed back to it."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


class Remembers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        hidden = torch.relu(self.up(x))
        return self.down(hidden), Memory(hidden)


def test_state_returned_by_the_model_follows_its_new_sizes(monkeypatch):
    masks = {"up": {"weight": rows(keep_mask(8), (8, 4))}}
    model = Remembers()
    check_speedup(model, masks, torch.randn(3, 4), torch.randn(5, 4), shrunk=["up.weight", "down.weight"])
    assert model(torch.randn(2, 4))[1].hidden.shape == (2, 8), "a returned tensor keeps its shape"

    plugin = types.ModuleType("memory_state_plugin")
    plugin.speedup_register_rules = speedup.hookimpl(lambda registry: registry.add_state(Memory))
    monkeypatch.setattr(manager, "_loaded", manager.load_plugins(extra=[plugin]))
    assert manager.loaded_plugins().plugins[-1].states == [f"{Memory.__module__}.{Memory.__qualname__}"]
    model = Remembers()
    check_speedup(model, masks, torch.randn(3, 4), torch.randn(5, 4), shrunk=["up.weight", "down.weight"])
    assert model(torch.randn(2, 4))[1].hidden.shape == (2, 4)


def test_registry_rejects_what_is_not_a_module_type_or_not_a_module_rule():
    registry = RuleRegistry()
    with pytest.raises(TypeError, match="nn.Module subclass"):
        registry.add_module(Base(), ModuleRule())
    with pytest.raises(TypeError, match="must be a ModuleRule"):
        registry.add_module(Base, object())


def test_registry_conflict_names_both_providers_but_a_plugin_may_override_core():
    registry = RuleRegistry()
    registry.add_module(Base, _rule(False))  # provider: speedup-core
    registry.provider = Provider("plugin-a", "1.0")
    override = _rule(False)
    registry.add_module(Base, override)
    assert registry.module_rule(Base()) is override
    registry.add_module(Base, override)  # the same distribution again: no conflict
    registry.provider = Provider("plugin-b", "2.0")
    registry.add_module(Base, _rule(False))  # recorded; an error only where the type is used
    with pytest.raises(speedup.PluginConflictError, match=r"plugin-a 1\.0.*plugin-b 2\.0.*Base"):
        registry.module_rule(Base())


def test_core_linear_rule_claims_subclasses_of_nn_linear_that_keep_forward():
    class KeepsForward(nn.Linear):
        pass

    class OverridesLinearForward(nn.Linear):
        def forward(self, x):
            return super().forward(x).relu()

    registry = manager.load_plugins().registry
    assert type(registry.module_rule(KeepsForward(2, 2))).__name__ == "LinearRule"
    assert registry.module_rule(OverridesLinearForward(2, 2)) is None


def test_unclaimed_subclass_overriding_forward_is_shrunk_through_its_operators():
    class ShiftedLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    torch.manual_seed(0)
    net = nn.Sequential(ShiftedLinear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    keep = keep_mask(10, 0.5, torch.Generator().manual_seed(0))
    masks = {"0": {"weight": rows(keep, (10, 6)), "bias": keep}}
    report = check_speedup(net, masks, torch.randn(3, 6), torch.randn(5, 6), shrunk=["0.weight", "2.weight"])
    assert type(net[0]) is ShiftedLinear
    # Not one node rebuilt by LinearRule: its parameters were sliced where its operators read them.
    assert "0" not in report.modules
    assert {"0.weight", "0.bias"} <= set(report.parameters)


class Interleave(nn.Module):
    """Interleaves the two halves of its input's channels, at fixed places: ``chunk`` then ``stack``."""

    def forward(self, x):
        first, second = x.chunk(2, dim=1)
        return torch.stack((first, second), dim=2).flatten(1, 2)


class Interleaved(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.mix, self.b = nn.Conv2d(3, 8, 1), Interleave(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.mix(self.a(x)))


def test_an_equivalent_form_loses_what_the_module_code_cannot(monkeypatch):
    """Channels 0, 1, 2 and 5 of ``a`` are masked. ``chunk`` cuts at the middle, so a position goes from
    both halves at once: only position 1 (channels 1 and 5) is masked in both, the others would leave the
    halves different counts. As a gather, the form renumbers its index instead and all four go."""
    keep = torch.tensor([False, False, False, True, True, False, True, True])
    masks = {"a": {"weight": rows(keep, (8, 3, 1, 1)), "bias": keep}}
    model = Interleaved()
    check_speedup(model, masks, torch.randn(1, 3, 4, 4), torch.randn(2, 3, 5, 5))
    assert model.a.out_channels == 6

    order = torch.stack((torch.arange(4), torch.arange(4, 8)), dim=1).reshape(-1)
    plugin = types.ModuleType("interleave_form_plugin")
    plugin.speedup_register_rules = speedup.hookimpl(
        lambda registry: registry.add_rewrite(Interleave, lambda module: ChannelGather(order)))
    monkeypatch.setattr(manager, "_loaded", manager.load_plugins(extra=[plugin]))
    assert manager.loaded_plugins().plugins[-1].rewrites == [f"{Interleave.__module__}.{Interleave.__qualname__}"]
    model = Interleaved()
    report = check_speedup(model, masks, torch.randn(1, 3, 4, 4), torch.randn(2, 3, 5, 5), shrunk=["a.weight", "b.weight"])
    assert model.a.out_channels == 4 and model.b.in_channels == 4
    assert isinstance(model.mix, ChannelGather) and report.forms == {"mix": ("Interleave", "ChannelGather")}
    # Interleaved, the kept channels 3, 4, 6, 7 of ``a`` come in the order 4, 6, 3, 7: positions 1, 2, 0, 3.
    assert model.mix.index.tolist() == [1, 2, 0, 3]


def test_registry_rejects_a_rewrite_that_is_not_a_function():
    with pytest.raises(TypeError, match="must be a function"):
        RuleRegistry().add_rewrite(Interleave, "not a function")
