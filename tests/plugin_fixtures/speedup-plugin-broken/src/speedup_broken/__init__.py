"""Test fixture: a plugin whose import fails, as when a dependency it needs is missing.

speedup must report it (entry point, distribution, version, error) and still load every other plugin.
"""

raise ImportError("speedup_broken needs a library that is not installed (this fixture fails on purpose)")
