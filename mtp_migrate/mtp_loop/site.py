"""A site: the accumulator initialisations before a head loop, the loop, and the head averages after it."""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst

from mtp_migrate.mtp_loop.spec import Average, LoopSpec
from mtp_migrate.refusals import Refusal


@dataclass(frozen=True)
class Site:
    """``block[start:stop]`` of one statement block; the head loop is ``block[loop_index]``."""

    block: tuple[cst.BaseStatement, ...]
    block_id: int  # id() of the Module or IndentedBlock holding ``block``
    start: int
    stop: int
    loop_index: int
    init_indices: tuple[int, ...]  # the zero initialisations the rewrite removes
    averages: tuple[Average, ...]
    indent: str  # absolute indentation of the block
    line: int  # the loop's first line
    span: tuple[int, int]  # first and last line of block[start:stop]
    scope: cst.FunctionDef | cst.Module
    spec: LoopSpec | None = None
    refusal: Refusal | None = None
    # Rho1-style (per-head weights, selected-sum normalisation, a valid-head count, a
    # head-0 metric): these get `del` by default instead of a rewrite.
    rho1_style: bool = False
    temporaries: tuple[str, ...] = ()  # tensors bound on every path through the body, dead after it

    @property
    def loop(self) -> cst.For:
        return self.block[self.loop_index]

    @property
    def kept(self) -> list[cst.BaseStatement]:
        """Statements between the first initialisation and the loop that stay, before the call."""
        return [self.block[i] for i in range(self.start, self.loop_index) if i not in self.init_indices]

    @property
    def statements(self) -> tuple[cst.BaseStatement, ...]:
        return self.block[self.start:self.stop]
