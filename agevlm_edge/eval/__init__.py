"""Evaluation: POPE, CHAIR, grounding, image-text-matching diagnostic, short-answer VQA.

Every suite runs on the ``EvalBackend`` interface (eval.backend); only ``TorchBackend``
imports torch, lazily, so an ONNX backend reuses the rest. Entry points: ``run_suite``
(any backend), ``evaluate`` (a RUN DIR), ``format_report``.
"""

from .backend import EvalBackend, TorchBackend
from .grounding import mask_to_grid
from .suite import DEFAULT_SUITES, evaluate, format_report, run_suite
from ..text import encode_with_spans

__all__ = ["EvalBackend", "TorchBackend", "mask_to_grid", "DEFAULT_SUITES", "evaluate",
           "format_report", "run_suite", "encode_with_spans"]
