"""dq: low-bit mixed-precision quantization for diffusers text-to-image pipelines.

    import dq
    pipe = dq.quantize(pipe, "w8a8", calib_prompts=prompts)
    pipe.save_pretrained("out")            # reloads with DiffusionPipeline.from_pretrained

`import dq` is cheap: it imports neither torch nor diffusers (so `dq --help` answers at once).
The public names below are imported on first use (PEP 562), and dq's quantizer is registered
with diffusers the moment diffusers' quantizer registry is imported — at once if it already
is, otherwise by an import hook (`dq._registration`) — so `import dq` before or after
`import diffusers` is enough for `DiffusionPipeline.from_pretrained` to load dq folders.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it (a module itself where the two are the same)
_EXPORTS = {
    "MixedPrecision": "dq.api",
    "apply_plan": "dq.api",
    "quantizable_layers": "dq.api",
    "quantize": "dq.api",
    "quantize_model": "dq.api",
    "resolve_plan": "dq.api",
    "PRESETS": "dq.config",
    "LayerSpec": "dq.config",
    "QuantConfig": "dq.config",
    "Sampling": "dq.generate",
    "generate": "dq.generate",
    "QWeight": "dq.quant",
    "quantize_weight": "dq.quant",
    "load": "dq.serialization",
    "save_pretrained": "dq.serialization",
    "fake_quantized": "dq.simulate",
    "spec_nbytes": "dq.storage",
    "formats": "dq.formats",
    "kernels": "dq.kernels",  # importing it registers the torch.ops.dq operators
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dq' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module == f"dq.{name}" else getattr(mod, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what static tools see; at run time `__getattr__` imports these on use
    from dq import formats, kernels  # noqa: F401
    from dq.api import (  # noqa: F401
        MixedPrecision,
        apply_plan,
        quantizable_layers,
        quantize,
        quantize_model,
        resolve_plan,
    )
    from dq.config import PRESETS, LayerSpec, QuantConfig  # noqa: F401
    from dq.generate import Sampling, generate  # noqa: F401
    from dq.quant import QWeight, quantize_weight  # noqa: F401
    from dq.serialization import load, save_pretrained  # noqa: F401
    from dq.simulate import fake_quantized  # noqa: F401
    from dq.storage import spec_nbytes  # noqa: F401

class _Package(types.ModuleType):
    """dq's module type: `dq.generate` stays the function when the submodule of the same name
    is imported (the import system binds a submodule to its parent's attribute on first load,
    which would otherwise replace the public function with the module)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "generate" and isinstance(value, types.ModuleType):
            value = value.generate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

from dq import _registration  # noqa: E402

_registration.install()
