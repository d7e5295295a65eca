"""Torch -> ONNX export with fused cross-attention (imported as ``agevlm_edge.export``)."""
