"""Which output objects a prediction gets."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from node.outputs._common import PredictionLike
from node.outputs.options import DELIVERY_ORDER, OutputKind, OutputOptions

__all__ = ["OutputPlan", "outputs_for"]


@dataclass(frozen=True)
class OutputPlan:
    """The objects to write, in delivery order (SEG, SR, GSPS, SC)."""

    kinds: tuple[OutputKind, ...]

    def __iter__(self) -> Iterator[OutputKind]:
        return iter(self.kinds)

    @property
    def seg(self) -> bool:
        return OutputKind.SEG in self.kinds

    @property
    def empty(self) -> bool:
        return not self.kinds


def outputs_for(prediction: PredictionLike, options: OutputOptions) -> OutputPlan:
    """`options.positive` or `options.negative`, in delivery order."""
    wanted = set(options.positive if prediction.positive else options.negative)
    return OutputPlan(tuple(kind for kind in DELIVERY_ORDER if kind in wanted))
