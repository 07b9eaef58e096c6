"""Notebook cells made into a file for an isolated child (flame.isolation.cell_export).

A kernel keeps each cell's source in `linecache` under a file name that does not exist on
disk; these tests register cells the same way, so the functions look exactly like a
notebook's, then import the exported file in a fresh namespace and call it."""

from __future__ import annotations

import importlib.util
import itertools
import linecache
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flame.errors import FlameError
from flame.isolation.cell_export import export_cell_function
from flame.isolation.locate import not_isolable

_cells = itertools.count()


def _notebook(*cells: str) -> dict[str, Any]:
    """Run `cells` as a kernel does: one namespace named __main__, sources in linecache."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    for source in cells:
        filename = f"/tmp/ipykernel_0/cell_{next(_cells)}.py"  # never written, as in ipykernel
        lines = source.splitlines(keepends=True)
        linecache.cache[filename] = (len(source), None, lines, filename)
        exec(compile(source, filename, "exec"), namespace)
    return namespace


def _load(locator: dict[str, Any]) -> Any:
    spec = importlib.util.spec_from_file_location(locator["module"], locator["file"])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, locator["qualname"])


def test_a_cell_function_with_its_helpers_constants_and_imports_runs_from_the_file() -> None:
    ns = _notebook(
        "import math as m\nfrom statistics import mean as average\n",
        "SCALE = 2.5\nLABELS = {'a': (1, 2), 'b': [3.0, None]}\nEMPTY = frozenset()\n",
        "def helper(x):\n    return m.floor(x * SCALE)\n",
        "def deco(f):\n    return f\n\n@deco\ndef analyze(data, k=len(LABELS)):\n"
        "    return [helper(v) for v in data] + [average(data), k, len(EMPTY)]\n",
    )
    locator = export_cell_function(ns["analyze"])
    assert locator is not None
    text = Path(locator["file"]).read_text()
    assert "import math as m" in text and "from statistics import mean as average" in text
    assert "SCALE = 2.5" in text and "def helper" in text and "def deco" in text
    exported = _load(locator)
    assert exported([1.0, 2.0]) == ns["analyze"]([1.0, 2.0]) == [2, 5, 1.5, 2, 0]
    assert Path(locator["file"]).parent.stat().st_mode & 0o077 == 0  # private folder


def test_the_export_follows_the_notebook_after_a_name_changes() -> None:
    ns = _notebook("N = 1\n", "def analyze(data):\n    return data + N\n")
    first = export_cell_function(ns["analyze"])
    ns["N"] = 5  # a later cell sets N = 5
    second = export_cell_function(ns["analyze"])
    assert first is not None and second is not None
    assert first["file"] != second["file"]
    assert _load(first)(1) == 2 and _load(second)(1) == 6


def test_only_names_the_code_loads_are_copied_not_every_notebook_variable() -> None:
    ns = _notebook(
        "import numpy as np\nbig = np.arange(10)\nsecret_token = 'tok-123'\n",
        "def analyze(data):\n    big = [1, 2]\n    return sum(big) + np.sum(data)\n",
    )
    locator = export_cell_function(ns["analyze"])
    assert locator is not None
    text = Path(locator["file"]).read_text()
    assert "tok-123" not in text and "big =" not in text.split("def analyze")[0]
    assert _load(locator)(np.array([1, 2])) == 6


def test_a_cell_class_is_copied_from_the_cell_its_methods_came_from() -> None:
    ns = _notebook(
        "import math\nFACTOR = 3\n",
        "class Base:\n    def scale(self, x):\n        return x * FACTOR\n",
        "def deco(cls):\n    return cls\n\n@deco\nclass Stats(Base):\n    OFFSET = FACTOR + 1\n"
        "    def __init__(self, xs):\n        self.xs = xs\n"
        "    @property\n    def total(self):\n        return math.fsum(self.xs) + self.OFFSET\n"
        "    @staticmethod\n    def make(xs):\n        return Stats(xs)\n",
        "def analyze(data):\n    s = Stats.make(data)\n    return s.scale(s.total)\n",
    )
    locator = export_cell_function(ns["analyze"])
    assert locator is not None
    text = Path(locator["file"]).read_text()
    assert text.index("class Base") < text.index("@deco\nclass Stats(Base)")
    assert _load(locator)([1.0, 2.0]) == ns["analyze"]([1.0, 2.0]) == 21.0


def test_numeric_arrays_scalars_and_non_finite_floats_are_copied_exactly() -> None:
    ns = _notebook(
        "import numpy as np\n"
        "W = np.arange(12, dtype=np.float32).reshape(3, 4) / 7\n"
        "M = np.array([[True, False]])\nC = np.array([1 + 2j, np.nan])\n"
        "S = np.int16(-7)\nLIMIT = float('nan')\nTOP = float('-inf')\n",
        "def analyze(data):\n    return W, M, C, S, LIMIT, TOP\n",
    )
    locator = export_cell_function(ns["analyze"])
    assert locator is not None
    w, m, c, s, limit, top = _load(locator)(None)
    for got, want in ((w, ns["W"]), (m, ns["M"]), (c, ns["C"])):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes() and got.flags.writeable
    assert type(s) is np.int16 and s == -7
    assert math.isnan(limit) and top == float("-inf")


@pytest.mark.parametrize(
    ("setup", "name", "kind"),
    [
        ("import numpy as np\nWEIGHTS = np.array(['a', None], dtype=object)\n", "WEIGHTS",
         "ndarray"),
        ("import pandas as pd\nWEIGHTS = pd.DataFrame({'w': [1.0, 2.0]})\n", "WEIGHTS",
         "DataFrame"),
        ("class Model:\n    pass\nWEIGHTS = Model\n", "WEIGHTS", "type"),  # no method: no cell
    ],
)
def test_a_name_that_cannot_be_copied_is_refused_by_name_with_the_fix(
    setup: str, name: str, kind: str
) -> None:
    ns = _notebook(setup, f"def analyze(data):\n    return data * {name}\n")
    with pytest.raises(FlameError) as refused:
        export_cell_function(ns["analyze"])
    message = str(refused.value)
    assert repr(name) in message and kind in message
    assert "isolate=False" in message and ".py file" in message
    assert "1.0" not in message and "nan" not in message.lower()  # no values


def test_code_without_kept_source_is_not_exported() -> None:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile("def analyze(data):\n    return data\n", "<stdin>", "exec"), namespace)
    assert export_cell_function(namespace["analyze"]) is None
    assert export_cell_function(math.floor) is None


def test_not_isolable_reports_the_refusal_instead_of_raising() -> None:
    ns = _notebook(
        "import numpy as np\nW = np.array([object()])\n", "def analyze(data):\n    return W\n"
    )
    main = sys.modules["__main__"]
    saved = getattr(main, "__file__", None)
    try:
        if saved is not None:
            del main.__file__  # as in a kernel: __main__ has no file
        problem = not_isolable(ns["analyze"])
    finally:
        if saved is not None:
            main.__file__ = saved
    assert "'W'" in problem and "isolate=False" in problem
