"""Run dq's catalogue of bad inputs and faults (tests/test_bad_inputs.py) and print the tally:
cases, clear answers (dq's error naming the problem and the fix, a clear warning, or correct
behaviour where dq used to be silently wrong), unclear ones, and data lost.

    .venv/bin/python eval/bad_input_catalogue.py | tee eval/results/bad_input_catalogue.log

Cases marked `pending_api` need a check dq/api.py does not call yet (dq.validate); they are
listed apart so the tally says what the library does today.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    catalogue: Path = REPO / "tests" / "test_bad_inputs.py"  # the case table
    threads: int = 1  # torch threads (the machine is shared)
    show_messages: bool = True  # print each case's message (first 160 characters)


def load_catalogue(path: Path):
    spec = importlib.util.spec_from_file_location("bad_input_catalogue_cases", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def main(s: Settings) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(s.threads)
    cat = load_catalogue(s.catalogue)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dq-bad-inputs-") as tmp:
        ctx = cat.Ctx(Path(tmp))
        for case in cat.CASES:
            t = time.perf_counter()
            res = cat.run_case(case, ctx)
            rows.append((case, res, time.perf_counter() - t))
    total = time.perf_counter() - t0

    print(f"{'area':6s} {'case':38s} {'kind':7s} {'result':9s} message")
    for case, res, _ in rows:
        verdict = "clear" if res.clear else ("LOST" if res.data_lost else "UNCLEAR")
        if case.pending_api and not res.clear:
            verdict = "pending"
        msg = " ".join(res.message.split())[:160] if s.show_messages else ""
        print(f"{case.area:6s} {case.id:38s} {case.kind:7s} {verdict:9s} {msg}")

    by_area = Counter(c.area for c, _, _ in rows)
    clear = sum(r.clear for _, r, _ in rows)
    pending = [c.id for c, r, _ in rows if c.pending_api and not r.clear]
    unclear = [c.id for c, r, _ in rows if not r.clear and not c.pending_api]
    lost = [c.id for c, r, _ in rows if r.data_lost]
    kinds = Counter(c.kind for c, r, _ in rows if r.clear)
    print()
    print(f"cases: {len(rows)} ({', '.join(f'{a} {n}' for a, n in by_area.items())})")
    print(f"clear: {clear} of {len(rows)} (errors {kinds['error']}, warnings {kinds['warning']}, "
          f"correct behaviour {kinds['works']})")
    print(f"pending the dq.validate calls in dq/api.py: {len(pending)} {pending}")
    print(f"unclear: {len(unclear)} {unclear}")
    print(f"data lost: {len(lost)} {lost}")
    print(f"time: {total:.1f} s")
    return 0 if not unclear and not lost else 1


if __name__ == "__main__":
    sys.exit(main(Settings()))
