"""Prompt router: ``p_large`` and a normalized embedding from one ONNX forward pass."""

from gateway.classifier.runtime import (
    Classifier,
    ClassifierError,
    RouterScore,
    load_classifier,
)
from gateway.classifier.text import select_text

__all__ = ["Classifier", "ClassifierError", "RouterScore", "load_classifier", "select_text"]
