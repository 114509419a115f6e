"""Quantized replacements for `nn.Linear` and `nn.Conv2d` holding real packed codes.

One vocabulary for every format (style.md §5): a quantized layer holds

- `qdata`: the weight codes in their storage dtype (`dq.storage`: int8 / uint8 values, two
  4-bit codes per byte, float8, or one FP bit pattern per byte), laid out on the flattened
  `[out, in * kh * kw]` weight;
- `scale` (float32, `[out]` per channel or `[out, groups]` per group) and, for asymmetric INT
  weights, `zero_point`;
- for quantized activations: `input_scale` and `input_zero_point` (0-dim, calibrated);
- `bias` in float.

`from_qweight` builds one from a float layer and a `dq.quant.QWeight` (the values are stored as
given, never re-rounded); `from_float` is `from_qweight(quantize_weight(...))`. `qweight()` and
`dequantize()` invert it. `forward` calls the `torch.ops.dq` kernels, which pick their
implementation from the backend setting in `dq.kernels` (never a patched forward).

Activations: per-tensor uint8 (asymmetric) and int8 (symmetric) activations run on the integer
W8A8 engines for every weight format whose grid is integers once scaled by one power of two:
signed INT up to 8 bits, and FP formats whose largest value is at most 127 of their smallest
step (FP4 E2M1 x 2, FP6 E2M3 x 8, FP4 E3M0 x 4, ...). Every other pair (unsigned or FP8
weights, 4-bit or FP8 activations) runs on the reference path: the activation is rounded onto
its grid (`dq.quant.fake_quantize_act`) and the weight-only kernel multiplies it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dq import formats, kernels, quant, storage  # noqa: F401  (kernels: registers torch.ops.dq)
from dq.config import LayerSpec
from dq.quant import QWeight
from dq.storage import resolve_spec  # noqa: F401  (re-exported: the plan resolver uses it)

# Activation formats the W8A8 engines execute: per-tensor uint8 asymmetric (FBGEMM/oneDNN style)
# and int8 symmetric (mapped onto the same engine with zero point 128 shifted in).
ENGINE_ACT_FORMATS = ("uint8", "int8")
_SYMMETRIC_ENGINE_ZP = 128  # q_u8 = q_s8 + 128

# kept for callers of the old name
pair_limited_codes = quant.pair_limited_values

_WEIGHT_VIEW_WARNED: set[str] = set()

# The CPU engine's packed weight replaces the codes after the first forward (one copy of the
# weight in memory); False keeps codes and the engine's cache side by side.
COMPACT_ENGINE_WEIGHTS = True


def weight_2d(w: torch.Tensor) -> torch.Tensor:
    """[out, in, *k] -> [out, in * prod(k)] (the layout codes and scales are defined on)."""
    return w.reshape(w.shape[0], -1)


def engine_step(fmt) -> float | None:
    """The power of two that turns every grid value of `fmt` into an int8 code, when the
    W8A8 engines can run it (signed INT: 1; FP with max / smallest step <= 127), else None."""
    fmt = formats.get(fmt)
    if fmt.kind == "int":
        return 1.0 if fmt.signed else None
    step = fmt.min_subnormal
    return step if fmt.max / step <= 127 else None


def runs_on_engine(spec: LayerSpec) -> bool:
    """Whether a spec with quantized activations runs on the integer W8A8 engines."""
    return spec.act in ENGINE_ACT_FORMATS and engine_step(spec.weight) is not None


def check_spec_fits(spec: LayerSpec, weight_shape: torch.Size | tuple[int, ...], name: str = "") -> None:
    """Raise ValueError when `spec` cannot be applied to a weight of `weight_shape`."""
    where = f" for layer {name!r}" if name else ""
    k = int(torch.Size(weight_shape)[1:].numel())
    fmt = formats.get(spec.weight)
    if spec.group_size and k % spec.group_size:
        raise ValueError(
            f"group size {spec.group_size} does not divide the {k} inputs per output channel{where}; "
            "use a group size that divides it, or 'channel' granularity"
        )
    if fmt.storage == "packed4" and k % 2:
        raise ValueError(
            f"4-bit codes are packed two per byte but the layer has an odd number ({k}) of "
            f"inputs per output channel{where}; use an 8-bit format for this layer"
        )


def _act_buffers(spec: LayerSpec, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_scale, input_zero_point) as stored: engine formats in the uint8 engine's terms
    (int8 symmetric -> zero point 128), other formats with zero point 0 when symmetric."""
    s, zp = quant.act_params(spec.act, lo, hi, symmetric=spec.act_symmetric)
    if zp is None:
        zp = torch.tensor(_SYMMETRIC_ENGINE_ZP if runs_on_engine(spec) else 0, dtype=torch.int32)
    elif runs_on_engine(spec) and spec.act_symmetric:
        zp = torch.tensor(_SYMMETRIC_ENGINE_ZP, dtype=torch.int32)
    return s.float(), zp.to(torch.int32)


def act_is_symmetric(spec: LayerSpec) -> bool:
    """Whether the activation grid of `spec` has no zero point (signed INT, FP, symmetric)."""
    fmt = formats.get(spec.act)
    return spec.act_symmetric or fmt.kind == "fp" or fmt.signed


def simulated_act(spec: LayerSpec, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The activation a layer with quantized inputs multiplies, in fp32 (the one rounding rule
    of modules, simulation and kernel references)."""
    if runs_on_engine(spec):  # uint8 engine codes; zero point 128 for symmetric int8
        return quant.fake_quantize_act(x, "uint8", scale, zero_point)
    fmt = formats.get(spec.act)
    if act_is_symmetric(spec) and fmt.kind == "int" and not fmt.signed:
        fmt = formats.get(f"int{fmt.bits}")
    return quant.fake_quantize_act(x, fmt, scale, None if act_is_symmetric(spec) else zero_point)


def bos_constants(float_module: nn.Linear, bos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bos_input [in], bos_output = float_module(bos) [out]) in fp32: the BOS token's
    full-precision key/value row, precomputed once."""
    bos = bos.detach().float().reshape(-1)
    if bos.numel() != float_module.in_features:
        raise ValueError(
            f"BOS embedding has {bos.numel()} values but the layer takes "
            f"{float_module.in_features}; pass token 0 of the encoder_hidden_states this layer "
            "projects"
        )
    with torch.no_grad():
        w = float_module.weight.detach().float()
        b = None if float_module.bias is None else float_module.bias.detach().float()
        out = F.linear(bos.to(w.device), w, None if b is None else b)
    return bos.clone().to(w.device), out


def bos_forward(x: torch.Tensor, bos_in: torch.Tensor, bos_out: torch.Tensor, fn) -> torch.Tensor:
    """A BOS-aware key/value projection: `fn` on tokens 1.. (and on token 0 where it is not
    the BOS), the precomputed `bos_out` where token 0 equals `bos_in`.

    x [B, L, in] -> [B, L, out]; other inputs go through `fn` whole. Branch-free
    (torch.where), so torch.compile sees no data-dependent control flow."""
    if x.dim() != 3 or x.shape[1] < 2:
        return fn(x)
    rest = fn(x[:, 1:])  # [B, L-1, out]
    head_q = fn(x[:, :1])  # [B, 1, out], used where token 0 is not BOS
    tol = 1e-2 * bos_in.abs().amax() + 1e-6
    is_bos = (x[:, 0].to(bos_in.dtype) - bos_in).abs().amax(dim=-1) <= tol  # [B]
    head = torch.where(is_bos[:, None, None], bos_out.to(head_q.dtype), head_q)
    return torch.cat([head, rest], dim=1)


class QuantizedLayerMixin:
    """Shared state and behaviour of quantized layers; subclasses add the float op."""

    spec: LayerSpec
    weight_shape: torch.Size

    def _init_quant_buffers(self, spec: LayerSpec, weight_shape: torch.Size, bias: bool) -> None:
        fmt = formats.get(spec.weight)
        out, k = weight_shape[0], int(torch.Size(weight_shape)[1:].numel())
        self.spec = spec
        self.weight_shape = torch.Size(weight_shape)
        groups = k // spec.group_size if spec.group_size else 0
        pshape = (out, groups) if groups else (out,)
        self.register_buffer("qdata", storage.qdata_like(fmt, out, k))
        self.register_buffer("scale", torch.ones(pshape, dtype=torch.float32))
        if quant.weight_has_zero_point(fmt):
            self.register_buffer("zero_point", torch.zeros(pshape, dtype=torch.float32))
        else:
            self.zero_point = None
        if spec.act is not None:
            self.register_buffer("input_scale", torch.tensor(1.0))
            self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int32))
        else:
            self.input_scale = None
            self.input_zero_point = None
        # derived from the format, not saved: the plan names the format
        self.register_buffer("lut", storage.code_lut(fmt), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None
        self._engine_cache: tuple | None = None

    def _load_qweight(
        self, qw: QWeight, bias: torch.Tensor | None, act_range: tuple[float, float] | None
    ) -> None:
        if qw.fmt != formats.get(self.spec.weight):
            raise ValueError(
                f"QWeight is in {qw.fmt.name} but the spec says {self.spec.weight}; quantize the "
                "weight with the layer's own spec (dq.quant.quantize_weight(w, spec))"
            )
        if qw.shape != self.weight_shape or qw.scale.numel() != self.scale.numel():
            raise ValueError(
                f"QWeight of shape {list(qw.shape)} with scale {list(qw.scale.shape)} does not fit "
                f"this layer (weight {list(self.weight_shape)}, scale {list(self.scale.shape)}); "
                "quantize the layer's own weight with its resolved spec"
            )
        self._restore_codes()
        self.qdata.copy_(storage.pack(qw.values, qw.fmt))
        self.scale.copy_(qw.scale.reshape(self.scale.shape))  # one group per row: [O, 1]
        if self.zero_point is not None:
            self.zero_point.copy_(qw.zero_point.reshape(self.zero_point.shape))
        if bias is not None:
            self.bias.data.copy_(bias.detach().float())
        if self.spec.act is not None:
            if act_range is None:
                raise ValueError(
                    f"{type(self).__name__} with activation format {self.spec.act!r} needs a "
                    "calibrated activation range; pass act_range=(min, max) or calibrate with "
                    "dq.quantize(..., calib_prompts=[...])"
                )
            s, z = _act_buffers(self.spec, *act_range)
            self.input_scale.copy_(s)
            self.input_zero_point.copy_(z)

    def qweight(self) -> QWeight:
        """The stored weight as a `QWeight` (grid values, scale, zero point)."""
        fmt = formats.get(self.spec.weight)
        k = int(self.weight_shape[1:].numel())
        values = storage.unpack(self.qdata, fmt, k)
        zp = None if self.zero_point is None else self.zero_point.float()
        return QWeight(values, self.scale.float(), zp, fmt, self.weight_shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the stored codes represent, shaped like the original weight."""
        return self.qweight().dequantize()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The float dtype of this layer's float tensors (bias, else scales)."""
        return (self.bias if self.bias is not None else self.scale).dtype

    @property
    def weight(self) -> torch.Tensor:
        """A float copy of the weight, dequantized from the codes (for code that reads
        `.weight`: diffusers' `fuse_qkv_projections`, attention processors, peft).

        Read-only in effect: it is a fresh tensor each read (writing to it does not change the
        layer; use `requantize(w)` to store a new weight). Each read costs a float copy of the
        weight, so the first read warns once per layer class."""
        if type(self).__name__ not in _WEIGHT_VIEW_WARNED:
            _WEIGHT_VIEW_WARNED.add(type(self).__name__)
            warnings.warn(
                f"{type(self).__name__}.weight is a float copy dequantized from the quantized "
                "codes: each read allocates the full float weight and writes to it are not "
                "stored. Call dequantize() explicitly to keep one, or requantize(w) to replace "
                "the weight; fuse projections / LoRAs before dq.quantize for the fastest model.",
                UserWarning, stacklevel=2,
            )
        return self.dequantize().to(self.compute_dtype).detach()

    def requantize(self, w: torch.Tensor) -> None:
        """Store the float weight `w` (shaped like the original weight) in this layer's own
        spec: round to nearest on fresh scales, activation range and bias kept. Used to fuse a
        LoRA into the codes."""
        spec = self.spec
        if tuple(w.shape) != tuple(self.weight_shape):
            raise ValueError(
                f"requantize got a weight of shape {list(w.shape)}; this layer's weight is "
                f"{list(self.weight_shape)}"
            )
        self._restore_codes()
        qw = quant.quantize_weight(w.detach().float().to(self.scale.device), spec)
        keep = (self.input_scale, self.input_zero_point)
        saved = None if keep[0] is None else (keep[0].clone(), keep[1].clone())
        self._load_qweight(qw, None, None if saved is None else (0.0, 1.0))
        if saved is not None:
            self.input_scale.copy_(saved[0])
            self.input_zero_point.copy_(saved[1])

    # --- one copy of the weight at run time -----------------------------------------------
    # After its first eager, gradient-free forward on the CPU engine a layer hands its codes
    # to the engine: `engine_weight` (oneDNN's packed int8 weight, a non-persistent buffer, so
    # `get_memory_footprint()` counts it) replaces `qdata`. Reading `qdata` (or `state_dict`,
    # `dequantize`, saving, copying, `.to()`) regenerates the codes exactly from it; writing
    # codes (`load_state_dict`, `requantize`, `.to()`) puts them back first.

    @property
    def qdata(self) -> torch.Tensor:
        """The weight codes (regenerated from the engine's packed weight when it holds them)."""
        bufs = self.__dict__["_buffers"]
        if "qdata" in bufs:
            return bufs["qdata"]
        if "engine_weight" in bufs:
            return self._codes_from_packed()
        raise AttributeError("qdata")

    def _conv_geo(self):
        if not isinstance(self, QConv2d):
            return None
        return (list(self.stride), list(self.padding), list(self.dilation), self.groups)

    def _codes_from_packed(self) -> torch.Tensor:
        from dq.kernels import cpu

        codes = cpu.unpack_codes(self._buffers["engine_weight"], self.weight_shape, self._conv_geo())
        fmt = formats.get(self.spec.weight)
        if fmt.kind == "int" and fmt.bits == 8:
            return codes
        values = codes.float() * engine_step(fmt)
        return storage.pack(values, fmt)

    def _restore_codes(self) -> None:
        """Put the codes back in `qdata` if the engine holds them."""
        if "engine_weight" not in self._buffers:
            return
        codes = self._codes_from_packed()
        rest = {k: v for k, v in self._buffers.items() if k != "engine_weight"}
        self._buffers = {"qdata": codes, **rest}  # qdata first, as registered
        self._non_persistent_buffers_set.discard("engine_weight")
        self.__dict__.pop("_engine_pair_max", None)

    def _can_run_packed(self, x: torch.Tensor) -> bool:
        from dq.kernels import cpu, get_backend

        return (
            COMPACT_ENGINE_WEIGHTS and x.device.type == "cpu" and cpu.ONEDNN_INT8
            and self.scale.dim() == 1 and get_backend() in ("auto", "cpu")
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and x.requires_grad)
        )

    def _engine_call(self, x: torch.Tensor, run_op) -> torch.Tensor:
        """Run the W8A8 engine: from the packed weight when the layer holds one, else through
        the `torch.ops.dq` op on the codes (then hand the codes to the engine)."""
        from dq.kernels import cpu

        packed = self._buffers.get("engine_weight")
        eligible = self._can_run_packed(x)
        if packed is not None and eligible:
            _, w_scale = self._engine_scale()
            return cpu.run_packed(
                x, packed, self._engine_pair_max, w_scale, self.bias, self.input_scale,
                self.input_zero_point, self._conv_geo(), conv=isinstance(self, QConv2d),
            )
        self._restore_codes()
        w, w_scale = self._engine_weight()
        y = run_op(w, w_scale)
        if eligible and self._codes_survive_packing(w):
            packed, pair_max = cpu.take_packed(w, self.weight_shape, w_scale, self._conv_geo())
            del self._buffers["qdata"]
            self._engine_cache = None
            self.register_buffer("engine_weight", packed, persistent=False)
            self._engine_pair_max = pair_max
        return y

    def _codes_survive_packing(self, w: torch.Tensor) -> bool:
        """Whether the stored codes come back exactly from the engine's int8 codes `w` (INT
        codes always; FP codes unless they hold negative zeros, which int8 cannot tell apart)."""
        fmt = formats.get(self.spec.weight)
        if fmt.kind == "int":
            return True
        ok = self.__dict__.get("_packs_exactly")
        if ok is None:
            k = int(self.weight_shape[1:].numel())
            again = storage.pack(w.float().reshape(w.shape[0], -1)[:, :k] * engine_step(fmt), fmt)
            ok = self._packs_exactly = bool(torch.equal(again, self._buffers["qdata"]))
        return ok

    def _engine_scale(self):
        fmt = formats.get(self.spec.weight)
        return None, self.scale if fmt.kind == "int" else self.scale * engine_step(fmt)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if "engine_weight" not in self._buffers:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        held = self._buffers
        rest = {k: v for k, v in held.items() if k != "engine_weight"}
        self._buffers = {"qdata": self._codes_from_packed(), **rest}
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._buffers = held

    def _load_from_state_dict(self, *args, **kwargs):
        self._restore_codes()
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._restore_codes()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        if "engine_weight" in self._buffers:
            rest = {k: v for k, v in self._buffers.items() if k != "engine_weight"}
            state["_buffers"] = {"qdata": self._codes_from_packed(), **rest}
            state["_non_persistent_buffers_set"] = self._non_persistent_buffers_set - {"engine_weight"}
            state.pop("_engine_pair_max", None)
        return state

    @property
    def _kernel_args(self) -> dict:
        fmt = formats.get(self.spec.weight)
        return {"bits": fmt.bits, "group_size": self.spec.group_size}

    @property
    def on_engine(self) -> bool:
        """Whether this layer's quantized activations run on the integer W8A8 engines."""
        return self.spec.act is not None and runs_on_engine(self.spec)

    def _engine_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 or packed signed 4-bit codes, per-channel/group scale) for the W8A8 ops.

        Signed INT codes are used as stored. FP codes become int8 values / step with the scale
        times step (both exact: step is a power of two), derived once per stored code tensor."""
        fmt = formats.get(self.spec.weight)
        if fmt.kind == "int":
            return self.qdata, self.scale
        key = (self.qdata.data_ptr(), self.qdata._version, self.scale._version, self.qdata.device)
        if self._engine_cache is None or self._engine_cache[0] != key:
            step = engine_step(fmt)
            k = int(self.weight_shape[1:].numel())
            codes = (storage.unpack(self.qdata, fmt, k) / step).round().to(torch.int8)
            self._engine_cache = (key, codes.to(self.qdata.device), self.scale * step)
        return self._engine_cache[1], self._engine_cache[2]

    def _simulated_input(self, x: torch.Tensor) -> torch.Tensor:
        return simulated_act(self.spec, x, self.input_scale, self.input_zero_point)

    def quant_nbytes(self) -> int:
        """Bytes of everything this layer stores (codes, scales, activation params, bias)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def quant_weight_nbytes(self) -> int:
        """Bytes of the quantized weight: codes, scales, zero points and activation parameters
        (equals `dq.storage.spec_nbytes(spec, weight_shape)`)."""
        names = ("qdata", "scale", "zero_point", "input_scale", "input_zero_point")
        return sum(t.numel() * t.element_size() for n in names if (t := getattr(self, n)) is not None)

    def extra_repr(self) -> str:
        s = self.spec
        act = s.act or "float"
        return f"{tuple(self.weight_shape)}, w={s.weight}/{s.weight_granularity}, a={act}"


class QLinear(QuantizedLayerMixin, nn.Module):
    """`nn.Linear` with quantized weights (and optionally activations)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LayerSpec):
        super().__init__()
        check_spec_fits(spec, (out_features, in_features))
        self.in_features, self.out_features = in_features, out_features
        self._init_quant_buffers(spec, torch.Size((out_features, in_features)), bias)

    @classmethod
    def from_qweight(
        cls, module: nn.Linear, qweight: QWeight, spec: LayerSpec,
        act_range: tuple[float, float] | None = None,
    ) -> QLinear:
        """Store `qweight` (e.g. learned rounding's result) as given, never re-rounded; `spec`
        must be the (shape-resolved) spec it was made with; `act_range` is the calibrated
        (min, max) of the input when `spec` quantizes activations."""
        q = cls(module.in_features, module.out_features, module.bias is not None, spec)
        q._load_qweight(qweight, module.bias, act_range)
        return q.to(module.weight.device)

    @classmethod
    def from_float(
        cls, module: nn.Linear, spec: LayerSpec, act_range: tuple[float, float] | None = None
    ) -> QLinear:
        """Quantize `module` with `spec` (round to nearest on the spec's scales)."""
        spec = resolve_spec(spec, module.weight.shape)
        return cls.from_qweight(module, quant.quantize_weight(module.weight, spec), spec, act_range)

    # --- BOS-aware text embedding (MixDQ) -------------------------------------------------
    def enable_bos(self, float_module: nn.Linear, bos: torch.Tensor) -> None:
        """Keep the BOS token's path in full precision: precompute `float_module(bos)`.

        With a causal text encoder (CLIP) token 0 of every prompt's embedding is the same BOS
        vector (and a large outlier); cross-attention key/value layers then output a constant
        for it. Rows whose token 0 equals `bos` get the precomputed float output; the other
        tokens (and any row whose token 0 differs, e.g. SDXL's all-zero unconditional
        embedding) go through the quantized kernel. Both constants are saved with the layer.

        Args:
            float_module: the float layer this one was quantized from.
            bos: [in_features] the BOS token's text embedding.
        """
        bos, out = bos_constants(float_module, bos)
        self.register_buffer("bos_input", bos.to(self.scale.device))
        self.register_buffer("bos_output", out.to(self.scale.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bos_out = self._buffers.get("bos_output")
        if bos_out is None:
            return self._forward_codes(x)
        return bos_forward(x, self._buffers["bos_input"], bos_out, self._forward_codes)

    def _forward_codes(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if x.device.type == "cpu":  # half precision is emulated (slow) on CPU; GPUs keep it
            x = x.float()
        if self.on_engine:
            y = self._engine_call(x, lambda w, w_scale: torch.ops.dq.linear_w8a8(
                x, w, w_scale, self.bias, self.input_scale, self.input_zero_point,
            ))
        else:
            if self.spec.act is not None:
                x = self._simulated_input(x)
            y = torch.ops.dq.linear_wonly(
                x, self.qdata, self.scale, self.zero_point, self.bias, self.lut,
                **self._kernel_args,
            )
        return y.to(dtype)


class QConv2d(QuantizedLayerMixin, nn.Module):
    """`nn.Conv2d` with quantized weights (and optionally activations)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
        stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
        bias: bool, spec: LayerSpec,
    ):
        super().__init__()
        shape = torch.Size((out_channels, in_channels // groups, *kernel_size))
        check_spec_fits(spec, shape)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), tuple(padding)
        self.dilation, self.groups = tuple(dilation), groups
        self._init_quant_buffers(spec, shape, bias)

    @staticmethod
    def check_float(module: nn.Conv2d) -> None:
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ValueError(
                f"Conv2d with padding={module.padding!r}, padding_mode={module.padding_mode!r} "
                "is not supported; keep this layer in float (add it to QuantConfig.skip)"
            )

    @classmethod
    def from_qweight(
        cls, module: nn.Conv2d, qweight: QWeight, spec: LayerSpec,
        act_range: tuple[float, float] | None = None,
    ) -> QConv2d:
        """As `QLinear.from_qweight`."""
        cls.check_float(module)
        q = cls(
            module.in_channels, module.out_channels, module.kernel_size, module.stride,
            module.padding, module.dilation, module.groups, module.bias is not None, spec,
        )
        q._load_qweight(qweight, module.bias, act_range)
        return q.to(module.weight.device)

    @classmethod
    def from_float(
        cls, module: nn.Conv2d, spec: LayerSpec, act_range: tuple[float, float] | None = None
    ) -> QConv2d:
        cls.check_float(module)
        spec = resolve_spec(spec, module.weight.shape)
        return cls.from_qweight(module, quant.quantize_weight(module.weight, spec), spec, act_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if x.device.type == "cpu":  # half precision is emulated (slow) on CPU; GPUs keep it
            x = x.float()
        conv = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
        if self.on_engine:
            y = self._engine_call(x, lambda w, w_scale: torch.ops.dq.conv2d_w8a8(
                x, w, w_scale, self.bias, self.input_scale, self.input_zero_point,
                *conv, list(self.weight_shape),
            ))
        else:
            if self.spec.act is not None:
                x = self._simulated_input(x)
            y = torch.ops.dq.conv2d_wonly(
                x, self.qdata, self.scale, self.zero_point, self.bias, self.lut, list(self.weight_shape),
                *conv, **self._kernel_args,
            )
        return y.to(dtype)


def quantized_module_for(module: nn.Module) -> type[QuantizedLayerMixin] | None:
    """The quantized class replacing `module`, or None if it is not quantizable."""
    if isinstance(module, QuantizedLayerMixin):
        return None
    if isinstance(module, nn.Linear):
        return QLinear
    if isinstance(module, nn.Conv2d):
        return QConv2d
    return None


def reference_forward(layer: QuantizedLayerMixin, x: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch forward from `dequantize()` (and real activation rounding), for tests."""
    w = layer.dequantize()
    if layer.spec.act is not None:
        x = layer._simulated_input(x)
    if isinstance(layer, QLinear):
        return F.linear(x, w, layer.bias)  # BOS-aware layers: compare tokens 1.. only
    return F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


# LoRA: make peft wrap these layers (dq.lora adds its dispatcher when peft is installed)
from dq import lora as _lora  # noqa: E402,F401
