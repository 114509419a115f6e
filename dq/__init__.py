"""dq: low-bit mixed-precision quantization for diffusers text-to-image pipelines.

    import dq
    pipe = dq.quantize(pipe, "w8a8", calib_prompts=prompts)
    pipe.save_pretrained("out")            # reloads with DiffusionPipeline.from_pretrained
"""

__version__ = "0.1.0"

from dq import formats  # noqa: E402
from dq import kernels as kernels  # noqa: E402  (registers the torch.ops.dq operators)
from dq.api import apply_plan, quantizable_layers, quantize, quantize_model, resolve_plan  # noqa: E402
from dq.config import PRESETS, LayerSpec, QuantConfig  # noqa: E402
from dq.serialization import load, save_pretrained  # noqa: E402  (registers the "dq" quantizer with diffusers)

__all__ = [
    "PRESETS",
    "LayerSpec",
    "QuantConfig",
    "apply_plan",
    "formats",
    "kernels",
    "load",
    "quantizable_layers",
    "quantize",
    "quantize_model",
    "resolve_plan",
    "save_pretrained",
]
