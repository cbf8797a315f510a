"""Explanations: saliency maps, overlays, localisation against lesion masks, faithfulness.

>>> from medsight.explain import Explainer, overlay
>>> explainer = Explainer.from_run("runs/phantom")        # doctest: +SKIP
>>> heatmap = explainer.explain(x)                       # (H, W) in [0, 1]
>>> overlay(display, heatmap, label="malignant 0.93").save("why.png")

``method="auto"`` uses the best method recorded in ``RUN/localisation.json`` (written by
:func:`score_localisation`), else Grad-CAM.
"""

from medsight.explain.attention_maps import token_blocks
from medsight.explain.cam import (
    METHODS,
    Explainer,
    best_method,
    candidate_layers,
    check_method,
    default_layer,
)
from medsight.explain.faithfulness import deletion_insertion, randomised_copy, sanity_check
from medsight.explain.files import explain_files
from medsight.explain.localisation import (
    box_from_map,
    box_iou,
    energy_in_mask,
    mask_box,
    pointing_game,
    region_from_map,
    score_localisation,
)
from medsight.explain.overlay import overlay

__all__ = [
    "METHODS",
    "Explainer",
    "best_method",
    "box_from_map",
    "box_iou",
    "candidate_layers",
    "check_method",
    "default_layer",
    "deletion_insertion",
    "energy_in_mask",
    "explain_files",
    "mask_box",
    "overlay",
    "pointing_game",
    "randomised_copy",
    "region_from_map",
    "sanity_check",
    "score_localisation",
    "token_blocks",
]
