"""Which output objects a prediction gets."""

from __future__ import annotations

from dataclasses import dataclass

from node.outputs._common import PredictionLike
from node.outputs.options import NegativePolicy, OutputOptions

__all__ = ["OutputPlan", "outputs_for"]


@dataclass(frozen=True)
class OutputPlan:
    seg: bool
    sc: bool

    @property
    def empty(self) -> bool:
        return not (self.seg or self.sc)


def outputs_for(prediction: PredictionLike, options: OutputOptions) -> OutputPlan:
    """Positive: SEG and SC (as enabled). Negative: as `options.negative_policy` says."""
    if prediction.positive:
        return OutputPlan(seg=options.write_seg, sc=options.write_sc)
    policy = NegativePolicy(options.negative_policy)
    if policy is NegativePolicy.SEG_AND_SC:
        return OutputPlan(seg=options.write_seg, sc=options.write_sc)
    if policy is NegativePolicy.SC_ONLY:
        return OutputPlan(seg=False, sc=options.write_sc)
    return OutputPlan(seg=False, sc=False)
