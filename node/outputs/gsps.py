"""Grayscale Softcopy Presentation State: the finding's outlines as vector graphics on the
original radiograph, with its own windowing, for PACS viewers that show neither SEG nor SR.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import pydicom

from node.outputs._common import (
    PredictionLike,
    algorithm_sentence,
    checked_mask,
    equipment,
    finding_sentence,
    series_description,
    set_body_part,
    source_header,
    with_disclaimer,
)
from node.outputs.options import AlgorithmInfo, OutputOptions
from node.outputs.regions import Region, regions_of

__all__ = ["GRAPHIC_LAYER", "build_gsps"]

GRAPHIC_LAYER = "PTX"
_CONTENT_LABEL = "PTX_OUTLINE"
# PS3.3 C.10.5.1.2: unformatted text of a text object; longer texts are cut by some viewers
_MAX_TEXT = 1024


def _voi(header: pydicom.Dataset) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """The source's first VOI window, so the radiograph looks as its modality meant."""
    center, width = header.get("WindowCenter"), header.get("WindowWidth")
    if center is None or width is None:
        return None
    first = lambda v: float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v)  # noqa: E731
    try:
        center_value, width_value = first(center), first(width)
    except (TypeError, ValueError, IndexError):
        return None
    if width_value < 1:
        return None
    return [hd.pr.SoftcopyVOILUTTransformation(window_center=center_value, window_width=width_value)]


def _presentation_lut(header: pydicom.Dataset) -> hd.PresentationLUTTransformation:
    """INVERSE for MONOCHROME1 (low values white), as dcmtk's own GSPS creation does; otherwise
    the radiograph shows as a negative."""
    inverse = header.get("PhotometricInterpretation") == "MONOCHROME1"
    shape = hd.PresentationLUTShapeValues.INVERSE if inverse else hd.PresentationLUTShapeValues.IDENTITY
    return hd.PresentationLUTTransformation(presentation_lut_shape=shape)


def build_gsps(
    source: pydicom.Dataset,
    prediction: PredictionLike,
    *,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    options: OutputOptions,
    regions: Sequence[Region] | None = None,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """Outlines (closed polylines, pixel units) of every region and a text with the finding;
    a negative gets the text only. `regions`: those of `regions_for` with the same arguments,
    when the caller has them already (None: computed here)."""
    mask = checked_mask(source, prediction.mask, algorithm=algorithm, series_instance_uid=series_instance_uid,
                        sop_instance_uid=sop_instance_uid)
    header = source_header(source, options)
    if regions is None:
        regions = regions_of(mask, getattr(prediction, "probability", None), header)
    rows, columns = mask.shape
    layer = hd.pr.GraphicLayer(
        layer_name=GRAPHIC_LAYER, order=1, description="Pneumothorax outline (ptx-node)",
        display_color=hd.color.CIELabColor.from_rgb(*options.outline_color),
    )
    outlines = [
        hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE, graphic_data=region.outline,
            units=hd.pr.AnnotationUnitsValues.PIXEL, is_filled=False,
            tracking_id=f"Pneumothorax region {region.number}", tracking_uid=hd.UID(),
        )
        for region in regions
    ]
    text = with_disclaimer(f"{finding_sentence(prediction)} {algorithm_sentence(algorithm)}", options)
    # a band across the top tenth of the image, clear of most anatomy
    label = hd.pr.TextObject(
        text_value=text[:_MAX_TEXT], units=hd.pr.AnnotationUnitsValues.PIXEL,
        bounding_box=(columns * 0.02, rows * 0.01, columns * 0.98, rows * 0.1),
        text_justification=hd.pr.TextJustificationValues.LEFT,
    )
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[header], graphic_layer=layer,
        graphic_objects=outlines or None, text_objects=[label],
    )
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[header],
        series_instance_uid=series_instance_uid,
        series_number=options.gsps_series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        **equipment(algorithm, options),
        content_label=_CONTENT_LABEL,
        content_description=with_disclaimer("Pneumothorax outline", options)[:64],
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        institution_name=options.institution_name,
        voi_lut_transformations=_voi(header),
        presentation_lut_transformation=_presentation_lut(header),
        series_description=series_description("GSPS", algorithm, options),
    )
    set_body_part(gsps, header)
    return gsps
