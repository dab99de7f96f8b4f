"""Test selection: issue 16's matrix (tests/test_matrix.py) runs whole only when asked for.

`python -m pytest -q` (README, CI) runs the covering subset marked `matrix_ci`; `python -m pytest -m
matrix` (or any -m expression naming `matrix`) runs every cell; a cell named by its node id always runs.
"""


def pytest_collection_modifyitems(config, items):
    if "matrix" in (config.getoption("markexpr") or ""):
        return
    named = {a for a in config.args if "::" in a}
    keep, drop = [], []
    for item in items:
        full_only = item.get_closest_marker("matrix") and not item.get_closest_marker("matrix_ci")
        (drop if full_only and item.nodeid not in named and not any(item.nodeid.endswith(n) for n in named)
         else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
