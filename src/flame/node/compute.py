"""Where and how a node runs `analyze` for an epoch, wired to its policy gate.

Why apart from the epoch loop: choosing the runner is the node's isolation decision. Nodes
and the CLI run `analyze` in an isolated child (forked from a fork server when pooled, as in
an isolated simulation); the Python API runs it in this process. Either way what it reads for
flame.dp statistics and what it sends to other nodes pass the node's gate, a message the
policy refused fails the epoch, and an abort or the end of the run (heard while the child
computes) stops the child at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flame.analysis.functions import AnalysisFunctions
from flame.errors import PolicyRefused
from flame.isolation.runner import ChildRunner, InProcessRunner, Outcome, Runner
from flame.node.context import Context
from flame.node.instructions import Instruction
from flame.privacy.policy import NodePolicy
from flame.privacy.release import Gate, column_reader

__all__ = ["Interrupted", "analyze_epoch", "make_runner", "stop_at_once"]


class Interrupted(Exception):
    """The aggregator ended the run (abort, finished) while this node was computing."""

    def __init__(self, instruction: Instruction) -> None:
        super().__init__(instruction.kind)
        self.instruction = instruction


def stop_at_once(runner: Runner) -> None:
    """A run that failed or was stopped does not wait for its analysis child to finish."""
    kill = getattr(runner, "_abandon", None)
    if callable(kill):
        with contextlib.suppress(Exception):
            kill()


def make_runner(
    functions: AnalysisFunctions,
    data: Any,
    context: Context,
    gate: Gate,
    *,
    isolate: bool,
    pooled: bool,
    timeout: float,
    policy: NodePolicy,
    hide: Sequence[str | Path],
    on_wait: Callable[[], None],
) -> Runner:
    """Where `analyze` runs: an isolated child (nodes, CLI) or this process (Python API).
    `on_wait` is called while the child computes (it raises `Interrupted` to stop it)."""
    if isolate and pooled:
        from flame.isolation.pooled import PooledRunner

        child: ChildRunner = PooledRunner(
            functions.analyze,
            data,
            context,
            timeout=timeout,
            cut_network=policy.cut_network,
            hide=hide,
            allow_messages=policy.allow_messages,
        )
        child.on_wait = on_wait
        runner: Runner = child
    elif isolate:
        child = ChildRunner(
            functions.analyze,
            data,
            context,
            timeout=timeout,
            cut_network=policy.cut_network,
            capture_output=policy.forward_logs,
            hide=hide,
            allow_messages=policy.allow_messages,
        )
        child.on_wait = on_wait
        runner = child
    else:
        runner = InProcessRunner(functions.analyze, data, context)
    hidden = [os.path.realpath(str(p)) for p in hide]
    gate.reader = column_reader(data, hidden)  # flame.dp statistics read data here
    # what analyze sends to other nodes leaves only as the policy allows (like a result)
    context.outgoing = lambda body: gate.message(context.epoch, body, runner.rows_read)
    return runner


def analyze_epoch(runner: Runner, gate: Gate, epoch: int, previous: Any) -> Outcome:
    """One epoch of `analyze`; a message the policy refused fails it with that reason."""
    if gate.policy.release == "protected" and isinstance(runner, InProcessRunner):
        raise PolicyRefused(  # code in the runtime's own process could undo any rule
            f"epoch {epoch}: this node releases only values it noised, which analyze in the "
            "runtime's own process could undo: run it isolated (flame.simulate(isolate=True), "
            "policy isolate = true) (rule: release = protected)"
        )
    try:
        outcome = runner.run(epoch, previous)
    except Interrupted:
        raise
    except Exception:
        gate.refused(epoch)  # the node's own refusal caused this: say so
        raise
    gate.refused(epoch)  # analyze caught the refusal and went on: the epoch fails
    return outcome
