"""dq: low-bit mixed-precision quantization for diffusers text-to-image pipelines.

    import dq
    pipe = dq.quantize(pipe, "w8a8", calib_prompts=prompts)
    pipe.save_pretrained("out")            # reloads with DiffusionPipeline.from_pretrained
"""

__version__ = "0.1.0"

from dq import formats  # noqa: E402
from dq import kernels as kernels  # noqa: E402  (registers the torch.ops.dq operators)
from dq.api import (  # noqa: E402
    MixedPrecision,
    apply_plan,
    quantizable_layers,
    quantize,
    quantize_model,
    resolve_plan,
)
from dq.config import PRESETS, LayerSpec, QuantConfig  # noqa: E402
from dq.generate import Sampling, generate  # noqa: E402
from dq.quant import QWeight, quantize_weight  # noqa: E402
from dq.serialization import load, save_pretrained  # noqa: E402  (registers the "dq" quantizer with diffusers)
from dq.simulate import fake_quantized  # noqa: E402
from dq.storage import spec_nbytes  # noqa: E402

__all__ = [
    "MixedPrecision",
    "PRESETS",
    "LayerSpec",
    "QWeight",
    "QuantConfig",
    "Sampling",
    "apply_plan",
    "fake_quantized",
    "formats",
    "generate",
    "kernels",
    "load",
    "quantizable_layers",
    "quantize",
    "quantize_model",
    "quantize_weight",
    "resolve_plan",
    "save_pretrained",
    "spec_nbytes",
]
