"""Loading analyze / aggregate / converged from a .py file or a folder (templates' shape)."""

from __future__ import annotations

import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from flame.analysis.functions import AnalysisFunctions
from flame.analysis.loader import load_analysis
from flame.errors import AnalysisLoadError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_imports() -> Iterator[None]:
    """Analyses are imported by module name; forget them after each test."""
    modules = dict(sys.modules)
    path = list(sys.path)
    yield
    for name in set(sys.modules) - set(modules):
        del sys.modules[name]
    for name, module in modules.items():
        if sys.modules.get(name) is not module:  # an analysis replaced an installed module
            sys.modules[name] = module
    assert sys.path == path, "load_analysis must leave sys.path as it found it"
    sys.path[:] = path


def write(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


ANALYZER = """
    def analyze(data, epoch, previous):
        return {{"tag": TAG, "data": data, "epoch": epoch, "previous": previous}}

    TAG = {tag!r}
"""

AGGREGATOR = """
    def aggregate(results, epoch, previous):
        return {{"tag": {tag!r}, "results": results, "epoch": epoch}}

    def converged(current, previous, epoch):
        return epoch >= 1
"""

MAIN = """
    import pathlib
    from aggregator_generic import aggregate, converged
    from analyzer_generic import analyze

    if __name__ == "__main__":
        pathlib.Path({marker!r}).write_text("main ran")
        raise SystemExit("main_generic must not run when flame loads the folder")
"""


def template_folder(folder: Path, tag: str) -> Path:
    write(folder, "analyzer_generic.py", ANALYZER.format(tag=tag))
    write(folder, "aggregator_generic.py", AGGREGATOR.format(tag=tag))
    write(folder, "main_generic.py", MAIN.format(marker=str(folder / "MAIN_RAN")))
    return folder


# --- what loads ------------------------------------------------------------------------------


def test_single_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "loader_single_file.py",
        """
        def analyze(data):
            return len(data)

        def aggregate(results):
            return sum(results.values())
        """,
    )
    loaded = load_analysis(path)
    assert loaded.files == (path,)
    assert loaded.functions.converged is None
    assert loaded.functions.analyze([1, 2, 3], epoch=0, previous=None) == 3
    assert loaded.functions.aggregate({"a": 3, "b": 4}, epoch=0, previous=None) == 7


def test_single_file_with_converged(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "loader_with_converged.py",
        """
        def analyze(data, epoch, previous): return 1
        def aggregate(results, epoch, previous): return 2
        def converged(current, previous, epoch): return current == previous
        """,
    )
    functions = load_analysis(str(path)).functions  # str paths work too
    assert functions.converged is not None
    assert functions.converged(3, previous=3, epoch=1) is True
    assert functions.converged(3, previous=2, epoch=1) is False


def test_template_shaped_folder(tmp_path: Path) -> None:
    folder = template_folder(tmp_path / "my_analysis", "first")
    loaded = load_analysis(folder)
    assert sorted(p.name for p in loaded.files) == [
        "aggregator_generic.py",
        "analyzer_generic.py",
        "main_generic.py",
    ]
    assert not (folder / "MAIN_RAN").exists()
    functions = loaded.functions
    assert functions.analyze("D", epoch=2, previous="P") == {
        "tag": "first",
        "data": "D",
        "epoch": 2,
        "previous": "P",
    }
    assert functions.aggregate({"n": 1}, epoch=0, previous=None)["tag"] == "first"
    assert functions.converged is not None
    assert functions.converged(None, previous=None, epoch=1) is True


def test_folder_ignores_tests_private_and_conftest(tmp_path: Path) -> None:
    folder = template_folder(tmp_path / "a", "x")
    boom = "raise RuntimeError('this file must not be imported')\n"
    write(folder, "test_analysis.py", boom)
    write(folder, "conftest.py", boom)
    write(folder, "_private.py", boom)
    write(folder, "notes.txt", boom)
    loaded = load_analysis(folder)
    assert {p.name for p in loaded.files} == {
        "aggregator_generic.py",
        "analyzer_generic.py",
        "main_generic.py",
    }


def test_the_repository_templates_load_as_they_are(tmp_path: Path) -> None:
    templates = REPO / "templates"
    if not (templates / "analyzer_generic.py").exists():
        pytest.skip("templates/ not present")
    copy = shutil.copytree(templates, tmp_path / "copied")
    functions = load_analysis(copy).functions
    assert callable(functions.analyze) and callable(functions.aggregate)


def test_two_analyses_with_the_same_module_names(tmp_path: Path) -> None:
    first = load_analysis(template_folder(tmp_path / "one", "first")).functions
    second = load_analysis(template_folder(tmp_path / "two", "second")).functions
    assert first.analyze(None, epoch=0, previous=None)["tag"] == "first"
    assert second.analyze(None, epoch=0, previous=None)["tag"] == "second"
    assert first.aggregate({}, epoch=0, previous=None)["tag"] == "first"
    assert second.aggregate({}, epoch=0, previous=None)["tag"] == "second"
    # and back again: the first folder, loaded anew, is itself again
    again = load_analysis(tmp_path / "one").functions
    assert again.analyze(None, epoch=0, previous=None)["tag"] == "first"


def test_two_single_files_with_the_same_name(tmp_path: Path) -> None:
    source = """
        def analyze(data): return {tag!r}
        def aggregate(results): return {tag!r}
    """
    a = write(tmp_path / "a", "analysis.py", source.format(tag="a"))
    b = write(tmp_path / "b", "analysis.py", source.format(tag="b"))
    assert load_analysis(a).functions.analyze(None) == "a"
    assert load_analysis(b).functions.analyze(None) == "b"


@pytest.mark.parametrize("helper", ["stats_util.py", "_stats_util.py"])
def test_two_analyses_with_same_named_helper_modules(tmp_path: Path, helper: str) -> None:
    module = helper[:-3]

    def folder(name: str, factor: int) -> Path:
        path = tmp_path / name
        write(path, helper, f"FACTOR = {factor}\n")
        write(
            path,
            "analyzer_generic.py",
            f"""
            from {module} import FACTOR

            def analyze(data):
                return FACTOR * data
            """,
        )
        write(path, "aggregator_generic.py", "def aggregate(results):\n    return results\n")
        return path

    first = load_analysis(folder("one", 2)).functions
    second = load_analysis(folder("two", 3)).functions
    assert first.analyze(10) == 20
    assert second.analyze(10) == 30


@pytest.mark.parametrize("module", ["json", "flame"])
def test_analysis_file_named_like_an_installed_module(tmp_path: Path, module: str) -> None:
    installed = sys.modules[module]
    path = write(
        tmp_path / "shadow",
        f"{module}.py",
        "def analyze(data):\n    return 1\n\ndef aggregate(results):\n    return 2\n",
    )
    try:
        functions = load_analysis(path).functions
    except AnalysisLoadError as exc:
        assert f"{module}.py" in str(exc)
    else:
        assert functions.aggregate({}) == 2
    assert sys.modules[module] is installed


def test_code_hash_follows_content(tmp_path: Path) -> None:
    folder = template_folder(tmp_path / "h", "v1")
    before = load_analysis(folder).code_hash()
    assert before == load_analysis(folder).code_hash()
    write(folder, "analyzer_generic.py", ANALYZER.format(tag="v2"))
    assert load_analysis(folder).code_hash() != before


# --- what does not load ----------------------------------------------------------------------


def test_missing_aggregate_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "loader_no_aggregate.py", "def analyze(data):\n    return 1\n")
    with pytest.raises(AnalysisLoadError) as caught:
        load_analysis(path)
    message = str(caught.value)
    assert "aggregate" in message and "no analyze" not in message
    assert "loader_no_aggregate.py" in message


def test_missing_both_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "empty_functions"
    write(folder, "one.py", "X = 1\n")
    write(folder, "two.py", "Y = 2\n")
    with pytest.raises(AnalysisLoadError) as caught:
        load_analysis(folder)
    message = str(caught.value)
    assert "analyze" in message and "aggregate" in message
    assert "one.py" in message and "two.py" in message


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("import flame_no_such_module_xyz\n", "flame_no_such_module_xyz"),
        ("def analyze(data:\n", "SyntaxError"),
        ("raise RuntimeError('setup exploded')\n", "setup exploded"),
        ("1 / 0\n", "ZeroDivisionError"),
    ],
)
def test_import_errors(tmp_path: Path, source: str, fragment: str) -> None:
    path = write(tmp_path, "loader_broken.py", source)
    with pytest.raises(AnalysisLoadError) as caught:
        load_analysis(path)
    message = str(caught.value)
    assert fragment in message and "loader_broken.py" in message
    assert "loader_broken" not in sys.modules


def test_import_error_in_a_folder_module(tmp_path: Path) -> None:
    folder = template_folder(tmp_path / "f", "x")
    write(folder, "analyzer_generic.py", "import flame_missing_dependency_q\n")
    with pytest.raises(AnalysisLoadError, match="flame_missing_dependency_q"):
        load_analysis(folder)


@pytest.mark.parametrize(
    ("path_name", "fragment"),
    [("does_not_exist", "does not exist"), ("analysis.txt", "not a Python file")],
)
def test_bad_paths(tmp_path: Path, path_name: str, fragment: str) -> None:
    (tmp_path / "analysis.txt").write_text("def analyze(d): pass")
    with pytest.raises(AnalysisLoadError, match=fragment):
        load_analysis(tmp_path / path_name)


def test_folder_without_python_files(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("nothing")
    with pytest.raises(AnalysisLoadError, match="no Python files"):
        load_analysis(tmp_path)


def test_not_a_function(tmp_path: Path) -> None:
    path = write(tmp_path, "loader_not_callable.py", "analyze = 5\ndef aggregate(r): pass\n")
    with pytest.raises(AnalysisLoadError, match="analyze"):
        load_analysis(path)


def test_defined_twice_in_two_files(tmp_path: Path) -> None:
    folder = tmp_path / "twice"
    write(folder, "one.py", "def analyze(data): return 1\ndef aggregate(r): return 1\n")
    write(folder, "two.py", "def analyze(data): return 2\n")
    with pytest.raises(AnalysisLoadError) as caught:
        load_analysis(folder)
    assert "one.py" in str(caught.value) and "two.py" in str(caught.value)


# --- signatures ------------------------------------------------------------------------------


def _load(tmp_path: Path, analyze_source: str) -> AnalysisFunctions:
    path = write(
        tmp_path,
        "loader_signature.py",
        analyze_source + "\n\ndef aggregate(results):\n    return results\n",
    )
    return load_analysis(path).functions


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def analyze(data):\n    return (data,)", ("D",)),
        ("def analyze(data, epoch):\n    return (data, epoch)", ("D", 4)),
        ("def analyze(data, previous):\n    return (data, previous)", ("D", "P")),
        (
            "def analyze(data, previous, epoch):\n    return (data, previous, epoch)",
            ("D", "P", 4),
        ),
        (
            "def analyze(data, **kw):\n    return (data, sorted(kw.items()))",
            ("D", [("epoch", 4), ("previous", "P")]),
        ),
        (
            "def analyze(data, epoch, extra=7):\n    return (data, epoch, extra)",
            ("D", 4, 7),
        ),
        ("def analyze(data, *, epoch):\n    return (data, epoch)", ("D", 4)),
        ("def analyze(*args):\n    return args", ("D",)),
        ("analyze = lambda data, epoch: (data, epoch)", ("D", 4)),
    ],
)
def test_accepted_signatures_get_what_they_ask_for(
    tmp_path: Path, source: str, expected: tuple
) -> None:
    functions = _load(tmp_path, source)
    assert functions.analyze("D", epoch=4, previous="P") == expected


@pytest.mark.parametrize(
    "source",
    [
        "def analyze(data, extra):\n    return 1",
        "def analyze(data, epoch, previous, threshold):\n    return 1",
        "def analyze():\n    return 1",
        "def analyze(*, data):\n    return 1",
    ],
)
def test_refused_signatures(tmp_path: Path, source: str) -> None:
    with pytest.raises(AnalysisLoadError, match="analyze"):
        _load(tmp_path, source)


def test_required_keyword_only_parameter_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(AnalysisLoadError, match="scale"):
        _load(tmp_path, "def analyze(data, *, scale):\n    return data * scale")


def test_aggregate_and_converged_signatures(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "loader_agg_sig.py",
        """
        def analyze(data): return data
        def aggregate(results, **kwargs): return sorted(kwargs)
        def converged(current): return current == "done"
        """,
    )
    functions = load_analysis(path).functions
    assert functions.aggregate({}, epoch=1, previous=None) == ["epoch", "previous"]
    assert functions.converged is not None
    assert functions.converged("done", previous=None, epoch=3) is True


def test_aggregate_with_extra_required_parameter(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "loader_agg_bad.py",
        "def analyze(data): return data\ndef aggregate(results, weights): return 0\n",
    )
    with pytest.raises(AnalysisLoadError, match="weights"):
        load_analysis(path)


def test_functions_of_directly() -> None:
    with pytest.raises(AnalysisLoadError, match="analyze"):
        AnalysisFunctions.of(None, lambda results: 0)
    with pytest.raises(AnalysisLoadError, match="aggregate"):
        AnalysisFunctions.of(lambda data: 0, None)
    with pytest.raises(AnalysisLoadError):
        AnalysisFunctions.of(lambda data: 0, "not callable")  # type: ignore[arg-type]
    functions = AnalysisFunctions.of(len, lambda results: 0)  # builtins without signatures
    assert functions.analyze([1, 2]) == 2
