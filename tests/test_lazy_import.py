"""`import dq` is cheap (no torch, no diffusers), the command line's quick answers stay that way,
and dq folders still load through plain diffusers whichever of the two is imported first."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dq

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers")


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res


def test_import_dq_and_quick_commands_import_neither_torch_nor_diffusers():
    res = _python(
        """
        import contextlib, io, sys
        import dq
        from dq.cli import main
        for argv in (["presets"], ["formats"], ["--version"], ["--help"]):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    rc = main(argv)
                except SystemExit as e:  # argparse's --help / --version
                    rc = e.code
            assert rc == 0 and out.getvalue().strip(), argv
            heavy = [m for m in ("torch", "diffusers") if m in sys.modules]
            print(argv[0], ",".join(heavy) or "-")
        """
    )
    lines = dict(line.split() for line in res.stdout.splitlines())
    assert lines == {"presets": "-", "formats": "-", "--version": "-", "--help": "-"}


def test_public_names_resolve_on_first_use_and_unknown_names_raise():
    for name in dq.__all__:
        assert getattr(dq, name) is not None, name
    assert set(dq.__all__) <= set(dir(dq))
    assert dq.formats.get("int4").bits == 4 and dq.kernels.get_backend()
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dq.nope  # noqa: B018


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from dq.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe = dq.quantize(pipe, "w8a16", progress=False)
    path = tmp_path_factory.mktemp("lazy") / "pipe"
    pipe.save_pretrained(path)
    return path


_LOAD = """
    import sys
    {before}
    from diffusers import DiffusionPipeline
    {after}
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
    from dq.modules import QuantizedLayerMixin
    n = sum(isinstance(m, QuantizedLayerMixin) for m in pipe.unet.modules())
    print(type(pipe.unet.hf_quantizer).__name__, n)
"""


@pytest.mark.parametrize("order", ["dq_first", "diffusers_first"])
def test_saved_folder_loads_through_diffusers_in_either_import_order(saved, order):
    if order == "dq_first":
        code = _LOAD.format(before="import dq; assert 'diffusers' not in sys.modules", after="")
    else:  # the registry is already imported when dq arrives: dq registers at once
        code = _LOAD.format(before="import diffusers.quantizers.auto",
                            after="import dq; assert not dq._registration.installed()")
    name, n = _python(code, str(saved)).stdout.split()
    assert name == "DQQuantizer" and int(n) > 50


def test_registration_hook_leaves_the_registry_module_as_diffusers_built_it():
    res = _python(
        """
        import dq, sys
        assert dq._registration.installed()
        import diffusers.quantizers.auto as auto
        assert not dq._registration.installed()      # one shot
        assert "dq" in auto.AUTO_QUANTIZER_MAPPING and "dq" in auto.AUTO_QUANTIZATION_CONFIG_MAPPING
        assert "bitsandbytes_4bit" in auto.AUTO_QUANTIZER_MAPPING  # diffusers' own entries kept
        assert type(auto.__loader__).__module__.startswith("_frozen_importlib")
        print("ok")
        """
    )
    assert res.stdout.strip() == "ok"


def test_dq_generate_stays_the_function_whatever_was_imported_first():
    res = _python(
        """
        import dq, dq.api, dq.sensitivity, sys   # these import the dq.generate submodule
        import dq.generate as g
        assert callable(dq.generate) and dq.generate is sys.modules["dq.generate"].generate
        assert g is dq.generate and dq.Sampling is sys.modules["dq.sampling"].Sampling
        print("ok")
        """
    )
    assert res.stdout.strip() == "ok"


def test_importing_dq_serialization_first_registers_without_a_warning():
    res = _python(
        """
        import warnings
        warnings.simplefilter("error")        # any registration warning fails the child
        import dq.serialization
        import diffusers.quantizers.auto as auto
        assert "dq" in auto.AUTO_QUANTIZER_MAPPING
        print("ok")
        """
    )
    assert res.stdout.strip() == "ok"
