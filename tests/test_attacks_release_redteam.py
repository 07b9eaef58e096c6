"""Red team on the node policy's allow-list, `release = "protected"`, from the hostile
analysis's seat: approved code in the isolated child that tries to get a record value (the
first row's age, 93817 on node-0 and 71234 on node-1) out of the node other than through the
documented residual channels (structure, marker parameters, message metadata).

Attacks that work are tests that fail now (they assert the secure behaviour); refused
attacks pass. Each docstring says what the attack is, why it works or is refused, and what
is claimed (docs/how-to/node-policy-dp.md, "Only protected values leave")."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

import flame
from flame.analysis.loader import load_analysis
from flame.errors import RunFailed
from flame.privacy.policy import NodePolicy
from flame.transport.memory import MemoryBroker

FIRST = {"node-0": 93817, "node-1": 71234}  # each node's first record's age
REST = [20, 30, 40, 50, 60, 70, 80, 90, 45, 55, 65]
NODES = {
    node: {"x.csv": "age,name\n" + "".join(f"{a},Zyxwv{a}\n" for a in [first, *REST])}
    for node, first in FIRST.items()
}
SECRETS = ("93817", "71234", "Zyxwv")


def _run(tmp_path: Path, source: str, policy: Any, *, isolate: bool = True, **kw: Any) -> Any:
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(source))
    functions = load_analysis(path).functions
    return flame.simulate(
        functions.analyze, functions.aggregate, data=NODES, isolate=isolate, policy=policy, **kw
    )


def _policy(tmp_path: Path, **rules: Any) -> NodePolicy:
    folder = tmp_path / "ledger"
    folder.mkdir(exist_ok=True)
    rules.setdefault("epsilon_budget", 1.0)
    return NodePolicy(release="protected", ledger_dir=folder, **rules)


def _leaked(value: Any) -> bool:
    """Whether `value` (anything the aggregator got) holds a record's age unnoised, to within
    1e-3 (a noised value falls within 0.5 of it by chance about one time in five)."""
    if isinstance(value, dict):
        return any(_leaked(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_leaked(v) for v in value)
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return any(_leaked(float(v)) for v in value.ravel())
    try:
        number = float(value)
    except (TypeError, ValueError):
        return any(s in str(value) for s in SECRETS)
    return any(abs(number - first) < 1e-3 for first in FIRST.values())


def _outcome(tmp_path: Path, source: str, policy: Any, **kw: Any) -> Any:
    """The run's value, or the refusal's text (RunFailed): what reached the aggregator."""
    try:
        return _run(tmp_path, source, policy, **kw).value
    except RunFailed as failure:
        return str(failure)


# --- attacks that work ----------------------------------------------------------------------

SLOTS = """
import flame

def analyze(data):
    age = data.read_csv()["age"]
    ctx = flame.context()
    nodes = sorted(ctx.participants)
    slots = [0.0] * len(nodes)
    slots[nodes.index(ctx.node_id)] = float(age[0])  # every other node contributes 0 here
    return {"s": flame.secure(slots, bound=1e6)}

def aggregate(results):
    return [float(v) for v in results.secure["s"]]
"""


def test_secure_sum_with_one_slot_per_node_releases_each_nodes_record(tmp_path: Path) -> None:
    """ATTACK (hostile analysis): `flame.secure([0, .., age[0], .., 0])` with the node's own
    record in its own slot (its index in `flame.context().participants`) and zeros
    elsewhere. The secure sum over the nodes is then the vector of every node's record,
    exact. Why it works: under "protected" anything inside flame.secure passes
    (`Gate._resolve`, release.py: `replace(value, values=self._resolve(value.values, path,
    True, release))`, encrypted=True skips the allow-list), and the same hostile code runs on
    every node, so the other contributions are the zeros it chose; min_contributors counts
    nodes, not nonzero contributions. Claimed: a flame.secure value "leaves only in a secure
    sum ... the aggregator reads only the sum over the run's contributors" as protection of a
    record; the same argument the module makes for flame.counts (the node cannot tell a count
    from a record) holds for a secure sum (no node can tell its partners contribute zeros):
    under "protected", flame.secure should pass only flame.dp-noised values."""
    policy = _policy(tmp_path)  # a budget too: nothing in it looks at a secure field
    got = _outcome(tmp_path, SLOTS, policy, secure=True)
    assert got != [float(FIRST["node-0"]), float(FIRST["node-1"])], got
    assert not _leaked(got), got


TINY_SENSITIVITY = """
import flame

def analyze(data):
    age = data.read_csv()["age"]
    return {"x": flame.dp.laplace(float(age[0]), 1e-9, 1.0)}

def aggregate(results):
    return {k: r["x"] for k, r in results.items()}
"""


def test_protected_without_a_budget_releases_a_laplace_of_tiny_sensitivity(
    tmp_path: Path,
) -> None:
    """ATTACK (hostile analysis): `release = "protected"` with no epsilon_budget (the rule is
    accepted on its own), and `flame.dp.laplace(age[0], sensitivity=1e-9, epsilon=1)`: the
    noise scale is 1e-9, so the record leaves exact to nine digits. Why it works: the
    analysis's own sensitivity claim is refused only when `derives_sensitivity` (policy.py:
    `return self.enforces_budget and not self.trust_sensitivity`), i.e. only under a
    budget; without one the marker is "a flame.dp marker the node resolves", so protected.
    (An epsilon of 1e12 with a true sensitivity works the same: no ledger, no limit.)
    Claimed: laplace/gaussian pass only "where trust_sensitivity lets them through"
    (trust_sensitivity is false here), every value leaves noised. `release = "protected"`
    should require an epsilon_budget, or refuse the analysis's sensitivity without one.
    Fixed: the policy refuses `release = "protected"` without an epsilon_budget (and so the
    analysis's own sensitivity is refused unless trust_sensitivity says otherwise)."""
    with pytest.raises(ValidationError, match="epsilon_budget"):
        NodePolicy(release="protected")
    got = _outcome(tmp_path, TINY_SENSITIVITY, _policy(tmp_path))
    assert not _leaked(got), got


IN_PROCESS = """
import flame
import flame.privacy.release as release

def analyze(data):
    age = data.read_csv()["age"]
    release.Gate._resolve = lambda self, value, *args, **kw: value  # the runtime's own gate
    return {"x": float(age[0])}

def aggregate(results):
    return {k: r["x"] for k, r in results.items()}
"""


def test_in_process_analyze_switches_the_rule_off(tmp_path: Path) -> None:
    """ATTACK (hostile analysis): with `analyze` in the runtime's process (flame.simulate's
    default isolate=False; `isolate = false` in a node's policy for `flame run`), it replaces
    `Gate._resolve` and returns the raw record. Why it works: the gate is an object of the
    process the analysis runs in; nothing refuses `release = "protected"` without isolation
    (policy.py accepts `isolate = false` with it; simulate does not isolate under it).
    Claimed: tests/test_policy_release.py `test_the_raw_value_is_refused_in_process_too`
    suggests the rule holds in process; it holds only for analysis code that does not touch
    flame. The rule should require isolation (refuse the combination, or isolate under it)."""
    import flame.privacy.release as release

    saved = release.Gate._resolve
    try:
        got = _outcome(tmp_path, IN_PROCESS, _policy(tmp_path), isolate=False)
    finally:
        release.Gate._resolve = saved  # type: ignore[method-assign]
    assert not _leaked(got), got


SUPPRESSED = """
import flame

def analyze(data):
    a = int(data.read_csv()["age"][0])
    digits = [int(d) for d in f"{a:05d}"]
    # digit d: d small cells (1 < min_cell_count = 5) among nine; the sum itself is noise-free
    # but worthless: the count of suppressed cells is what leaves, in the privacy report
    return {f"d{i}": flame.secure(flame.counts([1] * d + [10] * (9 - d)), bound=1e3)
            for i, d in enumerate(digits)}

def aggregate(results):
    return None
"""


def test_suppressed_cell_counts_in_the_privacy_report_carry_a_record(tmp_path: Path) -> None:
    """ATTACK (hostile analysis): `flame.secure(flame.counts(cells))` fields whose number of
    small cells is a digit of the record (d cells of 1 among nine, min_cell_count = 5). The
    node suppresses the small cells before encryption and reports how many per field in the
    privacy report it sends with its result (`report["suppressed"]`), exact and unnoised;
    the aggregator records it in the run's history (and the node's status). Five fields of
    nine cells (public, fixed lengths) carry 93817. Why it works: `Gate._resolve`
    (release.py: `release.suppressed[path or "value"] = hidden`) counts data-dependent cells
    and `Release.report` sends the counts; the allow-list looks only at values. Claimed:
    only dp-noised values and secure sums leave (structure aside: here the structure is
    fixed and the same on every node). Under "protected" the suppressed counts should stay
    on the node (or be refused: a small cell inside flame.secure needs no count outside).
    Fixed: flame.secure alone is no protection under the rule (its values must be noised),
    and the suppressed counts are not reported under it."""
    policy = _policy(tmp_path, min_cell_count=5)
    got = _outcome(tmp_path, SUPPRESSED, policy, secure=True)  # refused: counts are not noised
    assert isinstance(got, str) and "rule: release = protected" in got, got
    assert not _leaked(got), got
    # and where counts are noised, the number of suppressed cells stays on the node
    noised = SUPPRESSED.replace("flame.secure(flame.counts(", "flame.counts(flame.dp.laplace(")
    noised = noised.replace("), bound=1e3)", ", 1.0, 0.01))")
    run = _run(tmp_path, noised, _policy(tmp_path, min_cell_count=5, trust_sensitivity=True))
    assert all("suppressed" not in record for record in run.history[0].privacy.values())


# --- attacks refused --------------------------------------------------------------------------

HIDDEN = """
import collections, dataclasses, datetime, decimal, enum, fractions
import numpy as np
import pandas as pd
import flame

def analyze(data):
    t = data.read_csv()
    age = t["age"]
    a = int(age[0])
    Point = collections.namedtuple("Point", "x")
    @dataclasses.dataclass
    class Box:
        x: int
    Kind = enum.IntEnum("Kind", {"A": a})
    class Sub(dict):
        def items(self):
            return []
    class Iter:
        def __iter__(self):
            return iter([a])
    return {"out": {"x": %s}}

def aggregate(results):
    return {k: r["out"]["x"] for k, r in results.items()}
"""

HIDING = {
    "tuple": "(a,)",
    "set": "{a}",
    "frozenset": "frozenset([a])",
    "namedtuple": "Point(a)",
    "dataclass": "Box(a)",
    "dict_subclass": "Sub(k=a)",
    "iterable": "Iter()",
    "enum": "Kind.A",
    "numpy_0d": "np.array(a)",
    "numpy_scalar": "np.int64(a)",
    "numpy_structured": "np.array([(a,)], dtype=[('x', 'i8')])",
    "numpy_object": "np.array([a], dtype=object)",
    "masked_array": "np.ma.masked_array([a, 0], mask=[False, True])",
    "series": "pd.Series([a])",
    "index": "pd.Index([a])",
    "categorical": "pd.Categorical([str(a)])",
    "bytes": "str(a).encode()",
    "decimal": "decimal.Decimal(a)",
    "fraction": "fractions.Fraction(a)",
    "datetime": "datetime.datetime.fromtimestamp(a, datetime.timezone.utc)",
    "timedelta": "datetime.timedelta(seconds=a)",
    "complex": "complex(a, 0)",
    "datetime64": "np.datetime64(a, 's')",
    "arrow": "__import__('pyarrow').table({'x': [a]})",
    "nested_lists": "[[[[a]]]]",
    "counts_dict": "flame.counts({'c': a})",
    "counts_in_list": "[flame.counts(a)]",
    "laplace_string": "flame.dp.laplace(str(t['name'][0]), 1.0, 0.5)",
    "laplace_string_number": "flame.dp.laplace([str(a)], 1.0, 0.5)",
    "laplace_dict_string_leaves": "flame.dp.laplace({'n': str(t['name'][0])}, 1.0, 0.5)",
    "laplace_of_dict_number": "flame.dp.laplace({'n': a}, 1.0, 0.5)",
    "laplace_nan": "flame.dp.laplace([float('nan'), a], 1.0, 0.5)",
    "laplace_inf": "flame.dp.laplace([float('inf'), a], 1.0, 0.5)",
    "laplace_of_secure": "flame.dp.laplace(flame.secure(a, bound=1e6), 1.0, 0.5)",
    "laplace_of_counts": "flame.dp.laplace(flame.counts(a), 1.0, 0.5)",
    "laplace_of_laplace": "flame.dp.laplace(flame.dp.laplace(a, 1.0, 0.25), 1.0, 0.25)",
    "laplace_of_bool": "flame.dp.laplace(True, 1.0, 0.5)",
    "laplace_of_tuple_str": "flame.dp.laplace((a, 'Zyxwv'), 1.0, 0.5)",
    "laplace_huge_epsilon": "flame.dp.laplace(a, 1.0, 1e9)",
    "histogram_marker_bins": "flame.dp.histogram('age', [0, a, a + 1, 1e6], epsilon=0.5)",
    "sum_of_name_column": "flame.dp.sum('name', epsilon=0.5)",
    "secure_in_list_in_laplace": "flame.dp.laplace([flame.secure(a)], 1.0, 0.5)",
}


@pytest.mark.parametrize("case", sorted(HIDING))
def test_a_value_hidden_in_a_type_or_marker_does_not_leave(tmp_path: Path, case: str) -> None:
    """REFUSED (hostile analysis): a record value in a type the walk might not descend into
    or might take for a scalar, or inside a marker whose noise step might not noise it
    (strings, dicts of strings, NaN/inf, nested markers, flame.secure inside flame.dp). The
    walk refuses everything that is not a dict, list, tuple, None or a marker outside a
    marker (`Gate._resolve`'s last branch), the wire carries no other container, and
    `flame.dp.numbers` converts a marker's values to finite float64 before noising (a dict,
    a string or NaN is refused). The refusal names the field and the value's kind only."""
    policy = _policy(tmp_path, trust_sensitivity=True, min_cell_count=5)
    got = _outcome(tmp_path, HIDDEN % HIDING[case], policy)
    assert not _leaked(got), got


MESSAGE = """
import numpy as np
import flame

def analyze(data):
    t = data.read_csv()
    a = int(t["age"][0])
    try:
        flame.context().send("leak", {"x": %s}, to=%s)
    except Exception:
        pass  # caught: the epoch fails all the same
    return {"n": flame.dp.count("age", epsilon=0.1)}

def aggregate(results):
    return None
"""

MESSAGES = {
    "tuple_to_aggregator": ("(a,)", '["aggregator"]'),
    "numpy_to_a_node": (
        "np.int64(a)",
        "[n for n in flame.context().participants if n != flame.context().node_id][:1]",
    ),
    "secure_in_a_message": ("flame.secure(a, bound=1e6)", '["aggregator"]'),
    "laplace_of_a_string": ("flame.dp.laplace(str(t['name'][0]), 1.0, 0.1)", '["aggregator"]'),
    "counts_alone": ("flame.counts(a)", '["aggregator"]'),
}


@pytest.mark.parametrize("case", sorted(MESSAGES))
def test_a_message_carrying_a_record_is_refused_before_it_leaves(tmp_path: Path, case: str) -> None:
    """REFUSED (hostile analysis): a record in a message (`flame.context().send`) to the
    aggregator or to a node, as a tuple, a numpy scalar, inside flame.secure (messages are
    not encrypted), inside a laplace marker as a string, or as flame.counts alone. The body
    passes `Gate.message`, the result's walk; a caught refusal fails the epoch anyway."""
    seen: list[Any] = []

    def watch(envelope: Any) -> bool:
        if envelope.kind == "message":
            seen.append(envelope.body)
        return True

    body, to = MESSAGES[case]
    policy = _policy(tmp_path, trust_sensitivity=True, min_cell_count=5)
    got = _outcome(tmp_path, MESSAGE % (body, to), policy, broker=MemoryBroker(on_send=watch))
    assert isinstance(got, str) and "PolicyRefused" in got, (got, seen)  # the epoch failed
    assert not _leaked(got) and not _leaked(seen), (got, seen)


@pytest.mark.parametrize("spelling", ["Protected", "protectd", "protected ", "true"])
def test_a_misspelt_release_is_refused_not_read_as_any(tmp_path: Path, spelling: str) -> None:
    """REFUSED (policy file): a misspelt `release` would silently mean "any" if it fell
    back to the default; the Literal field refuses it when the file is read, naming it."""
    from flame.errors import ConfigError
    from flame.privacy.policy import load_policy

    path = tmp_path / "policy.toml"
    path.write_text(f'epsilon_budget = 1.0\nrelease = "{spelling}"\n')
    with pytest.raises(ConfigError, match="release"):
        load_policy(path)
