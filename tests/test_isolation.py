"""`analyze` in an isolated child process: same results, no secrets, structured failures,
large arrays through shared memory, data/messages/state through the node runtime."""

from __future__ import annotations

import mmap
import os
import socket
from pathlib import Path

import numpy as np
import pytest

import flame
from flame.analysis.loader import load_analysis
from flame.data import Data, MemorySource
from flame.errors import AnalysisError, FlameError, RunFailed
from flame.isolation.runner import ChildRunner, RowMeter, scrubbed_environment
from flame.node.context import Context
from flame.node.mailbox import Mailbox
from flame.transport.memory import MemoryBroker, MemoryTransport

NODES = {
    f"node-{i}": {"x.csv": "v\n" + "".join(f"{i + j}\n" for j in range(i + 2))} for i in range(3)
}

ANALYSIS = """
import os
import numpy as np
import flame

def analyze(data, epoch, previous):
    ctx = flame.context()
    v = data.read_csv()["v"]
    ctx.save("seen", int(v.size))
    ctx.set_progress(0.5)
    env = sorted(k for k in os.environ if (k.startswith("FLAME") or "TOKEN" in k)
                 and k != "FLAME_ANALYSIS_CHILD")
    return {"n": int(v.size), "sum": float(v.sum()), "env": env,
            "node": ctx.node_id, "saved": ctx.load("seen"), "pid": os.getpid()}

def aggregate(results, epoch, previous):
    return results
"""

FAILING = """
def helper(x):
    raise ValueError(f"no good: {x}")

def analyze(data):
    return helper(41 + 1)

def aggregate(results):
    return results
"""


def _write(tmp_path: Path, text: str, name: str = "analysis.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _context(node: str = "node-0") -> Context:
    transport = MemoryTransport(MemoryBroker(), "iso", node)
    return Context(
        analysis_id="iso",
        node_id=node,
        role="analysis",
        participants=[node],
        aggregator_id="aggregator",
        mailbox=Mailbox(transport),
        seed=1,
    )


def test_isolated_run_equals_in_process_and_sees_no_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLAME_BROKER__TOKEN", "s3cr3t-broker-token")
    monkeypatch.setenv("MY_API_TOKEN", "another-secret")
    analysis = load_analysis(_write(tmp_path, ANALYSIS)).functions
    isolated = flame.simulate(analysis.analyze, analysis.aggregate, data=NODES, isolate=True)
    plain = flame.simulate(analysis.analyze, analysis.aggregate, data=NODES)
    for node, result in isolated.value.items():
        assert result["env"] == []  # the child's environment holds no FLAME_* and no token
        assert result["pid"] != os.getpid()
        assert result["saved"] == result["n"]  # node-local state through the runtime
        expected = plain.value[node]
        assert (result["n"], result["sum"], result["node"]) == (
            expected["n"],
            expected["sum"],
            expected["node"],
        )
    assert plain.value["node-0"]["env"] != []  # in-process the analysis would have seen them


def test_messages_between_isolated_nodes() -> None:
    import test_messaging

    value = flame.simulate(
        test_messaging.analyze, test_messaging.aggregate, data=test_messaging.NODES, isolate=True
    ).value
    test_messaging.check(value)


def test_failure_comes_back_structured_with_analysis_frames_only(tmp_path: Path) -> None:
    analysis = load_analysis(_write(tmp_path, FAILING)).functions
    data = Data({"memory": MemorySource({"x.csv": "v\n1\n"})}, node_id="node-0")
    runner = ChildRunner(analysis.analyze, data, _context())
    try:
        with pytest.raises(AnalysisError) as caught:
            runner.run(0, None)
    finally:
        runner.close()
    error = caught.value
    assert error.remote_type == "ValueError"
    assert str(error) == "no good: 42"
    assert "analysis.py" in error.traceback_text and "in helper" in error.traceback_text
    assert "flame/isolation" not in error.traceback_text
    assert "ValueError: no good: 42" in error.traceback_text
    # and through a whole run: the aggregator names node, epoch and the original error
    with pytest.raises(RunFailed, match=r"ValueError: no good: 42"):
        flame.simulate(analysis.analyze, analysis.aggregate, data=NODES, isolate=True)


def test_large_array_crosses_as_a_view_of_shared_memory(tmp_path: Path) -> None:
    code = "import numpy as np\ndef analyze(data):\n    return {'a': np.arange(2_000_000.0)}\n"
    code += "def aggregate(results):\n    return results\n"
    analysis = load_analysis(_write(tmp_path, code)).functions
    data = Data({"memory": MemorySource({"x.csv": "v\n1\n"})}, node_id="node-0")
    runner = ChildRunner(analysis.analyze, data, _context())
    try:
        array = runner.run(0, None).result["a"]
    finally:
        runner.close()
    assert np.array_equal(array, np.arange(2_000_000.0))
    base = array
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    assert isinstance(base, mmap.mmap)  # no copy through the socket, no pickle


def test_rows_read_are_counted_by_the_runtime(tmp_path: Path) -> None:
    code = "def analyze(data):\n    data.read_csv('a.csv'); data.read_csv('a.csv')\n"
    code += "    return len(data.read_text('b.txt'))\ndef aggregate(r):\n    return r\n"
    analysis = load_analysis(_write(tmp_path, code)).functions
    files = {"a.csv": "v\n1\n2\n3\n", "b.txt": "not\nrows\n"}
    runner = ChildRunner(analysis.analyze, Data({"m": MemorySource(files)}), _context())
    try:
        outcome = runner.run(0, None)
    finally:
        runner.close()
    assert outcome.rows_read == 3  # a file read twice counts once; text files are not rows
    meter = RowMeter()
    meter.file("s", "t.tsv", b"a\tb\n1\t2\n\n3\t4\n")
    assert meter.rows == 2


def test_environment_is_an_allow_list() -> None:
    env = scrubbed_environment(
        {
            "PATH": "/bin",
            "FLAME_SECURE__PRIVATE_KEY_FILE": "/k",
            "AWS_SECRET_ACCESS_KEY": "x",
            "LC_ALL": "C",
            "HOME": "/root",
        }
    )
    assert env == {"PATH": "/bin", "LC_ALL": "C", "HOME": "/root"}


def test_lambda_cannot_run_isolated() -> None:
    with pytest.raises(FlameError, match="cannot run isolated"):
        ChildRunner(lambda data: 1, Data({"m": MemorySource({})}), _context())


def test_child_has_no_network_where_the_kernel_allows(tmp_path: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    code = f"""
import socket
def analyze(data):
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
        return "connected"
    except OSError as exc:
        return "blocked"
def aggregate(r):
    return r
"""
    analysis = load_analysis(_write(tmp_path, code)).functions
    runner = ChildRunner(analysis.analyze, Data({"m": MemorySource({})}), _context())
    try:
        runner.start()
        if runner.network != "cut":
            pytest.skip(f"network namespaces unavailable here: {runner.network}")
        assert runner.run(0, None).result == "blocked"
    finally:
        runner.close()
        server.close()


def test_row_meter_counts_json_lines_and_parquet() -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"v": list(range(7))}), buffer)
    meter = RowMeter()
    meter.file("s", "a.parquet", buffer.getvalue())
    meter.file("s", "b.jsonl", b'{"v": 1}\n{"v": 2}\n\n')
    assert meter.rows == 9


def test_policy_can_forbid_messages_from_an_isolated_analysis() -> None:
    import test_messaging

    with pytest.raises(RunFailed, match="allow_messages"):
        flame.simulate(
            test_messaging.analyze,
            test_messaging.aggregate,
            data=test_messaging.NODES,
            isolate=True,
            policy=flame.NodePolicy(allow_messages=False),
        )
