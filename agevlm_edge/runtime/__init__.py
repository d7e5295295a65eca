"""On-device inference: numpy + onnxruntime + tokenizers + Pillow, no torch.

    rt = Runtime("EXPORT_DIR")                     # verifies manifest hashes
    image = rt.encode_images([rt.load_image("photo.png")])   # vision graph once per image
    for piece in rt.stream(image, "Question: Is there a cat? Answer:"): print(piece, end="")

Nothing here imports torch, transformers, the evaluation suites or the toolchain stage
packages (a test blocks them).
"""

from .manifest import FORMAT_VERSION, load_manifest
from .session import GenerationConfig, Runtime

__all__ = ["FORMAT_VERSION", "GenerationConfig", "Runtime", "load_manifest"]
