"""The plugin hooks' documentation cannot drift from the hooks (in the manner of datasette's test_docs.py).

Every hook specification in ``speedup/plugins/hookspec.py`` must have a docstring documenting each
of its arguments (``:param name:``, and no argument it does not have), and every hook must be
described in ``CONTRIBUTING.md`` at the root of the repository, where plugin authors read about them.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from speedup.plugins import hookspec

REPOSITORY = Path(__file__).resolve().parent.parent
CONTRIBUTING = REPOSITORY / "CONTRIBUTING.md"


def _hookspecs() -> dict:
    """The functions of ``hookspec`` marked ``@hookspec`` (pluggy tags them with ``<project>_spec``)."""
    marker = f"{hookspec.PROJECT}_spec"
    return {
        name: function
        for name, function in inspect.getmembers(hookspec, inspect.isfunction)
        if getattr(function, marker, None) is not None
    }


HOOKS = _hookspecs()


def test_hookspec_module_declares_hooks():
    assert "speedup_register_rules" in HOOKS, sorted(HOOKS)
    assert all(name.startswith(f"{hookspec.PROJECT}_") for name in HOOKS), sorted(HOOKS)


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_has_a_docstring_documenting_each_argument(name):
    function = HOOKS[name]
    doc = inspect.getdoc(function)
    assert doc, f"hook {name} has no docstring"
    arguments = list(inspect.signature(function).parameters)
    for argument in arguments:
        assert re.search(rf":param\s+{re.escape(argument)}\s*:", doc), (
            f"the docstring of hook {name} does not document its argument '{argument}' (':param {argument}:')"
        )
    documented = re.findall(r":param\s+(\w+)\s*:", doc)
    stale = sorted(set(documented) - set(arguments))
    assert not stale, f"the docstring of hook {name} documents arguments it does not have: {stale}"


def test_contributing_exists():
    assert CONTRIBUTING.is_file(), f"{CONTRIBUTING} is missing: it is where plugin authors read about the hooks"


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_is_documented_in_contributing(name):
    if not CONTRIBUTING.is_file():
        pytest.fail(f"{CONTRIBUTING} is missing, so hook {name} is not documented there")
    text = CONTRIBUTING.read_text(encoding="utf-8")
    assert re.search(rf"\b{re.escape(name)}\b", text), f"hook {name} is not mentioned in CONTRIBUTING.md"
