"""The objects the node sends back to the PACS: a DICOM SEG and a secondary-capture overlay."""

from node.outputs.options import AlgorithmInfo, NegativePolicy, OutputOptions
from node.outputs.policy import OutputPlan, outputs_for
from node.outputs.render import render_overlay, write_png
from node.outputs.sanitize import sanitize_source
from node.outputs.sc import build_overlay
from node.outputs.seg import SEGMENT_LABEL, algorithm_identification, build_seg

__all__ = [
    "SEGMENT_LABEL",
    "AlgorithmInfo",
    "NegativePolicy",
    "OutputOptions",
    "OutputPlan",
    "algorithm_identification",
    "build_overlay",
    "build_seg",
    "outputs_for",
    "render_overlay",
    "sanitize_source",
    "write_png",
]
