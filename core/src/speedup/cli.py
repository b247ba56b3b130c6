"""``speedup plugins``: what is installed, what each plugin covers, and what failed to load."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .plugins.manager import load_plugins, strict_from_environment


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="speedup", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    plugins = commands.add_parser("plugins", help="list installed plugins and the rules they provide")
    plugins.add_argument("-v", "--verbose", action="store_true", help="list every module type and operator")
    plugins.add_argument("--strict", action="store_true", help="exit with an error if a plugin fails to load")
    options = parser.parse_args(argv)
    return _plugins(options.verbose, options.strict)


_LISTED = (("modules", "module"), ("ops", "op    "), ("sizes", "sizes "), ("states", "state "),
           ("recognisers", "recognises with"), ("rewrites", "rewrites"), ("pruning", "prune "))
"""What ``speedup plugins -v`` lists for each plugin: its table, and the label of each entry."""

_COUNTED = (("sizes", "size attributes", "size attributes"), ("states", "state types", "state types"),
            ("recognisers", "module recogniser", "module recognisers"), ("rewrites", "equivalent form", "equivalent forms"),
            ("pruning", "pruning pieces", "pruning pieces"))


def _counts(info) -> list[str]:
    """A plugin's summary: module types and operators, then each other table it fills."""
    counts = [f"{len(info.modules)} module types", f"{len(info.ops)} operators"]
    for table, one, many in _COUNTED:
        count = len(getattr(info, table))
        if count:
            counts.append(f"{count} {one if count == 1 else many}")
    return counts


def _plugins(verbose: bool, strict: bool) -> int:
    loaded = load_plugins(strict=False)
    strict = strict or strict_from_environment()
    failed = False
    for info in loaded.plugins:
        status = "ok" if info.ok else f"FAILED: {info.error}"
        print(f"{info.distribution} {info.version}  [{info.name} = {info.target}]  {status}")
        if info.ok:
            print("  " + ", ".join(_counts(info)))
            if verbose:
                for table, label in _LISTED:
                    for name in getattr(info, table):
                        print(f"    {label} {name}")
        failed |= not info.ok
    registry = loaded.registry
    for key in registry.conflicts:
        print(f"CONFLICT: {registry.conflict_message(key)}")
    return 1 if (failed or registry.conflicts) and strict else 0


def run() -> None:
    """Console entry point: like :func:`main`, quiet when its output is piped into ``head``."""
    try:
        sys.exit(main())
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)


if __name__ == "__main__":
    run()
