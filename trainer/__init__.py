"""ptx-train: SIIM-ACR / PTX-498 training and evaluation for the ptx-node model.

Modules: ``rle`` (challenge RLE), ``synth`` (phantoms, DICOM writer), ``data`` (layouts,
cache, splits), ``config`` (recipes), ``training`` (loop), ``thresholds`` (post-processing
search), ``metrics``, ``evaluate``, ``plots``, ``testing`` (tiny checkpoints for tests),
``cli`` (the ``ptx-train`` command). Imports ``model``, never ``node``.
"""

__all__: list[str] = []
