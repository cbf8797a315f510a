"""medsight in the hospital's own systems: a DICOM node receiving studies (C-STORE), a DICOMweb
poll (QIDO-RS / WADO-RS), and results sent back as DICOM (SR, heat-map overlay)."""

from medsight.integration.dicom_node import DicomNode, context_from_dicom
from medsight.integration.results import (
    ResultSender,
    StoreDestination,
    StowDestination,
    pending_results,
)

__all__ = [
    "DicomNode",
    "ResultSender",
    "StoreDestination",
    "StowDestination",
    "context_from_dicom",
    "pending_results",
]
