"""The objects the node sends back to the PACS: DICOM SEG, TID 1500 SR, GSPS and a
secondary-capture overlay."""

from node.outputs.gsps import build_gsps
from node.outputs.options import DELIVERY_ORDER, AlgorithmInfo, OutputKind, OutputOptions
from node.outputs.policy import OutputPlan, outputs_for
from node.outputs.regions import regions_for
from node.outputs.render import render_overlay, write_png
from node.outputs.sanitize import SourceHeader, prepare_source_header, sanitize_source
from node.outputs.sc import build_overlay
from node.outputs.seg import SEGMENT_LABEL, algorithm_identification, build_seg
from node.outputs.sr import ReferencedSeg, build_sr

__all__ = [
    "DELIVERY_ORDER",
    "SEGMENT_LABEL",
    "SourceHeader",
    "AlgorithmInfo",
    "OutputKind",
    "OutputOptions",
    "OutputPlan",
    "ReferencedSeg",
    "algorithm_identification",
    "build_gsps",
    "build_overlay",
    "build_seg",
    "build_sr",
    "outputs_for",
    "prepare_source_header",
    "regions_for",
    "render_overlay",
    "sanitize_source",
    "write_png",
]
