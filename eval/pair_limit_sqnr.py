"""What the AVX2 pair limit costs in weight precision: SQNR of int8, pair-limited int8 and int7
weights (per channel, min-max), on the embedded UNet's layers and on SD-size random layers.

    .venv/bin/python eval/pair_limit_sqnr.py      (writes eval/results/pair_limit_sqnr.log)
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from torch import nn

from dq import assets
from dq.config import LayerSpec
from dq.modules import QConv2d, QLinear
from dq.quant import sqnr_db

SPECS = {
    "int8": LayerSpec("int8", "channel"),
    "int8 pair<=128": LayerSpec("int8", "channel", pair_limit=128),
    "int7": LayerSpec("int7", "channel"),
}


def weight_sqnr(layer: nn.Module) -> dict[str, float]:
    qcls = QLinear if isinstance(layer, nn.Linear) else QConv2d
    w = layer.weight.detach()
    return {name: sqnr_db(w, qcls.from_float(layer, spec).dequantize()) for name, spec in SPECS.items()}


def main() -> None:
    torch.manual_seed(0)
    groups = {
        "SD-size, torch default init (uniform)": [nn.Linear(1280, 320), nn.Conv2d(320, 320, 3)],
        "SD-size, normal": [nn.Linear(1280, 320), nn.Conv2d(320, 320, 3)],
        "SD-size, Laplace": [nn.Linear(1280, 320), nn.Conv2d(320, 320, 3)],
    }
    with torch.no_grad():
        for m in groups["SD-size, normal"]:
            m.weight.normal_()
        for m in groups["SD-size, Laplace"]:
            m.weight.copy_(torch.distributions.Laplace(0.0, 1.0).sample(m.weight.shape))
    unet = assets.load_embedded_pipeline().unet
    groups["embedded UNet (every Linear/Conv2d)"] = [
        m for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    lines = ["weight SQNR in dB (median over layers), per channel min-max scales", ""]
    for title, layers in groups.items():
        rows = [weight_sqnr(m) for m in layers]
        med = {k: statistics.median(r[k] for r in rows) for k in SPECS}
        lines.append(f"{title:38s} ({len(rows):3d} layers)  " + "  ".join(f"{k} {v:5.1f}" for k, v in med.items()))
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).parent / "results" / "pair_limit_sqnr.log"
    out.write_text("# .venv/bin/python eval/pair_limit_sqnr.py\n" + text + "\n")


if __name__ == "__main__":
    main()
