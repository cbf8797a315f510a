"""Models: timm backbones, custom CNNs, attention blocks and transfer-learning helpers.

Build any model by name with :func:`create_model`; :func:`list_models` and :func:`model_table`
show the registered ones, :func:`get_spec` what medsight knows about one.
"""

from medsight.models.attention import ATTENTION_KINDS, create_attention
from medsight.models.custom import MedCNN
from medsight.models.ensemble import EnsembleClassifier, model_from_config
from medsight.models.spec import ModelSpec
from medsight.models.transfer import ClassifierHead, MedsightClassifier
from medsight.models.weights import hub_reachable, load_weights, verify_sha256
from medsight.models.zoo import (
    classifier_from_config,
    create_model,
    get_spec,
    list_models,
    model_table,
)

__all__ = [
    "ATTENTION_KINDS",
    "ClassifierHead",
    "EnsembleClassifier",
    "MedCNN",
    "MedsightClassifier",
    "ModelSpec",
    "classifier_from_config",
    "create_attention",
    "create_model",
    "get_spec",
    "hub_reachable",
    "list_models",
    "load_weights",
    "model_from_config",
    "model_table",
    "verify_sha256",
]
