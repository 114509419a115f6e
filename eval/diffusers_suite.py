"""Run the ported diffusers quantization suite (tests/test_diffusers_suite.py) and write a tally.

    .venv/bin/python eval/diffusers_suite.py                      # the working tree
    .venv/bin/python eval/diffusers_suite.py --rev HEAD~1         # the same suite on an older dq

The suite file is always the current one; with `--rev` it runs against dq as it was at that
revision (a temporary `git worktree`), which gives the "before" column of a change. Results
go to `eval/results/diffusers_suite.log`: passed / failed / xfailed per category, and every
test that did not pass with its one-line reason.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = "tests/test_diffusers_suite.py"

# test-name prefix -> category, first match wins
CATEGORIES = [
    ("test_num_parameters", "num_parameters"),
    ("test_memory", "memory footprint"),
    ("test_inference", "inference"),
    ("test_dtype", "dtype casts"),
    ("test_device", "devices / device_map"),
    ("test_lora", "LoRA adapters"),
    ("test_training", "training"),
    ("test_serialization", "serialization"),
    ("test_config", "config"),
    ("test_layers", "quantized layers"),
    ("test_keep_in_fp32", "keep_in_fp32"),
    ("test_modules_to_not_convert", "modules_to_not_convert"),
    ("test_dequantize", "dequantize"),
    ("test_compile", "torch.compile"),
    ("test_quantize_on_load", "quantize-on-load"),
    ("test_pipeline", "PipelineQuantizationConfig"),
]


@dataclasses.dataclass
class Settings:
    rev: str | None = None  # run against dq at this git revision (None: the working tree)
    out: Path = REPO / "eval/results/diffusers_suite.log"  # the tally
    label: str = ""  # a name for this run in the log (default: the revision or "working tree")
    append: bool = False  # add to the log instead of replacing it (for before/after in one file)


def category(name: str) -> str:
    base = name.split("[")[0]
    return next((c for p, c in CATEGORIES if base.startswith(p)), "other")


def run_suite(root: Path, junit: Path) -> float:
    """pytest on the suite with `root` first on the path; returns the wall time."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    t0 = time.time()
    subprocess.run(
        [sys.executable, "-m", "pytest", str(root / SUITE), "-q", "-p", "no:cacheprovider",
         f"--junitxml={junit}", f"--rootdir={root}"],
        cwd=root, env=env, check=False,
    )
    return time.time() - t0


def read_junit(junit: Path) -> list[tuple[str, str, str]]:
    """(test name, outcome, one-line reason) for every test case."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, reason = "passed", ""
        for child in case:
            msg = (child.get("message") or child.text or "").strip().splitlines()
            first = msg[0][:160] if msg else ""
            if child.tag in ("failure", "error"):
                outcome, reason = ("failed" if child.tag == "failure" else "error"), first
            elif child.tag == "skipped":
                is_xfail = (child.get("type") or "") == "pytest.xfail" or first.startswith("xfail")
                outcome, reason = ("xfailed" if is_xfail else "skipped"), first
        rows.append((case.get("name"), outcome, reason))
    return rows


def tally(rows: list[tuple[str, str, str]], label: str, seconds: float) -> str:
    by_cat: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for name, outcome, _ in rows:
        by_cat[category(name)][outcome] += 1
    total = collections.Counter(o for _, o, _ in rows)
    kinds = ["passed", "failed", "error", "xfailed", "skipped"]
    lines = [
        f"## {label}: {total['passed']} passed of {len(rows)} "
        f"({', '.join(f'{total[k]} {k}' for k in kinds[1:] if total[k]) or 'nothing else'}); "
        f"{seconds:.0f} s",
        "",
        f"{'category':30s} " + " ".join(f"{k:>8s}" for k in kinds),
    ]
    order = [c for _, c in CATEGORIES] + ["other"]
    for cat in sorted(by_cat, key=order.index):
        lines.append(f"{cat:30s} " + " ".join(f"{by_cat[cat][k]:8d}" for k in kinds))
    bad = [(n, o, r) for n, o, r in rows if o != "passed"]
    if bad:
        lines += ["", "not passed:"]
        lines += [f"  {o:8s} {n}: {r}" for n, o, r in bad]
    return "\n".join(lines) + "\n\n"


def main(s: Settings) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        if s.rev is None:
            seconds = run_suite(REPO, junit)
            label = s.label or "working tree"
        else:
            wt = Path(tmp) / "wt"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(wt), s.rev], check=True)
            try:
                for f in (SUITE, "tests/conftest.py"):  # today's suite, on that revision's dq
                    shutil.copy(REPO / f, wt / f)
                seconds = run_suite(wt, junit)
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], check=False)
            label = s.label or f"dq at {s.rev}"
        text = tally(read_junit(junit), label, seconds)
    s.out.parent.mkdir(parents=True, exist_ok=True)
    if s.append and s.out.exists():
        text = s.out.read_text() + text
    else:
        text = (f"# ported diffusers quantization suite ({SUITE}), "
                f"{time.strftime('%Y-%m-%d')}\n\n") + text
    s.out.write_text(text)
    return text


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default=None, help="run against dq at this git revision")
    ap.add_argument("--label", default="", help="name of this run in the log")
    ap.add_argument("--append", action="store_true", help="append to the log")
    a = ap.parse_args()
    print(main(Settings(rev=a.rev, label=a.label, append=a.append)))
