"""Encoder loading, the relation heads, focal loss and artifact save/load (no Ray, no MLflow)."""

from drugprot.model.artifacts import ArtifactError, LoadedModel, load_artifact, save_artifact, verify_manifest
from drugprot.model.heads import GeneTypeClassifier, RelationModel
from drugprot.model.loss import focal_loss

__all__ = ["ArtifactError", "GeneTypeClassifier", "LoadedModel", "RelationModel", "focal_loss", "load_artifact",
           "save_artifact", "verify_manifest"]
