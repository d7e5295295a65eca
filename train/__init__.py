"""Staged training of AGE-VLM (imported as ``agevlm_edge.train``; filled by the training issue)."""
