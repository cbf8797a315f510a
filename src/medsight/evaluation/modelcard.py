"""The model card's fixed statements, shared by the HTML report and the REST API's ``/v1/model``.

One wording, so the page a practitioner uploads to and the report a reviewer reads never drift.
"""

from __future__ import annotations

from collections.abc import Sequence

INTENDED_USE = (
    "Research and teaching: studying how image models behave on {classes} images, and at "
    "most a second reader in a research setting, always after a qualified clinician has read "
    "the image."
)
NOT_FOR_DIAGNOSIS = (
    "Not a medical device, not clinically validated, not for diagnosing, triaging or treating "
    "patients, and not for any decision about a person."
)


def intended_use(classes: Sequence[str]) -> str:
    """The intended-use statement for a model of ``classes``, with the not-for-diagnosis line.

    >>> intended_use(["normal", "pneumonia"]).split(":")[0]
    'Research and teaching'
    """
    use = INTENDED_USE.format(classes=", ".join(classes))
    return f"{use} Not for diagnosis: {NOT_FOR_DIAGNOSIS[0].lower()}{NOT_FOR_DIAGNOSIS[1:]}"
