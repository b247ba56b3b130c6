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


def _plugins(verbose: bool, strict: bool) -> int:
    loaded = load_plugins(strict=False)
    strict = strict or strict_from_environment()
    failed = False
    for info in loaded.plugins:
        status = "ok" if info.ok else f"FAILED: {info.error}"
        print(f"{info.distribution} {info.version}  [{info.name} = {info.target}]  {status}")
        if info.ok:
            summary = f"  {len(info.modules)} module types, {len(info.ops)} operators"
            summary += f", {len(info.sizes)} size attributes" if info.sizes else ""
            summary += f", {len(info.states)} state types" if info.states else ""
            count = len(info.recognisers)
            summary += f", {count} module recogniser{'s' if count != 1 else ''}" if count else ""
            count = len(info.rewrites)
            summary += f", {count} equivalent form{'s' if count != 1 else ''}" if count else ""
            print(summary + (f", {len(info.pruning)} pruning pieces" if info.pruning else ""))
            if verbose:
                for name in info.modules:
                    print(f"    module {name}")
                for name in info.ops:
                    print(f"    op     {name}")
                for name in info.sizes:
                    print(f"    sizes  {name}")
                for name in info.states:
                    print(f"    state  {name}")
                for name in info.recognisers:
                    print(f"    recognises with {name}")
                for name in info.rewrites:
                    print(f"    rewrites {name}")
                for name in info.pruning:
                    print(f"    prune  {name}")
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
