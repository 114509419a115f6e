"""Share dq-quantized pipelines on the Hugging Face Hub.

`push_to_hub(pipe, "me/sd-turbo-w4a8")` saves the pipeline in the hub layout (atomic
`dq.serialization.save_pretrained`), adds a model card saying how it was quantized and how to
load it, and uploads the folder with `huggingface_hub.HfApi` in one commit.

Example:
    >>> import dq
    >>> pipe = dq.quantize(pipe, "w4a16")
    >>> dq.hub.push_to_hub(pipe, "me/sd15-w4a16", private=True)
    >>> # anyone: import dq; DiffusionPipeline.from_pretrained("me/sd15-w4a16")
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from dq.serialization import DQQuantizer, save_pretrained

__all__ = ["model_card", "push_to_hub"]

_CARD_MARK = "<!-- model card written by dq.hub.push_to_hub -->"


def _plans(pipe: Any) -> dict[str, Any]:
    """Component name -> its resolved QuantConfig, for dq-quantized components."""
    comps = getattr(pipe, "components", None) or {"model": pipe}
    out = {}
    for name, comp in comps.items():
        q = getattr(comp, "hf_quantizer", None)
        if isinstance(q, DQQuantizer):
            out[name] = q.quantization_config.quant_config
    return out


def model_card(pipe: Any, repo_id: str) -> str:
    """A README.md for a dq-quantized pipeline: hub metadata, the format mix, how to load.

    Args:
        pipe: the quantized pipeline (or model).
        repo_id: the repository it is pushed to (used in the loading snippet).
    """
    import dq

    lines = [
        "---",
        "library_name: diffusers",
        "tags:",
        "- dq",
        "- quantized",
        "- text-to-image",
        "---",
        "",
        _CARD_MARK,
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A {type(pipe).__name__} quantized with [dq](https://pypi.org/project/dq/) "
        f"{dq.__version__}: packed codes and scales in safetensors, the per-layer plan in each "
        "quantized component's `config.json` (`quantization_config`).",
        "",
    ]
    for comp, cfg in sorted(_plans(pipe).items()):
        mix = Counter(
            "float" if s is None else f"{s.weight}/{s.weight_granularity}, act={s.act or 'float'}"
            for s in cfg.layers.values()
        )
        lines += [
            f"## `{comp}` ({cfg.name})",
            "",
            "| layers | weights / granularity, activations |",
            "|---:|---|",
        ]
        lines += [f"| {n} | {k} |" for k, n in mix.most_common()]
        lines.append("")
    lines += [
        "## Load",
        "",
        "```python",
        "import dq  # registers the dq quantizer with diffusers",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{repo_id}")',
        "```",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(
    pipe: Any,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    local_dir: str | os.PathLike | None = None,
    **save_kwargs: Any,
) -> Any:
    """Save `pipe` in the hub format and upload it to `repo_id` in one commit.

    Args:
        pipe: a dq-quantized diffusers pipeline (or model).
        repo_id: "user/name" of the model repository (created if missing).
        token: Hugging Face token (default: the logged-in one).
        private: create the repository as private.
        commit_message: default "Upload dq-quantized <PipelineClass>".
        create_pr: open a pull request instead of committing to `revision`.
        revision: branch to commit to (default: main).
        local_dir: keep the uploaded folder here (default: a temporary folder, removed after);
            saving into it follows `dq.save_pretrained` (a folder dq did not write needs
            overwrite=True), and a README.md of the user's there is kept, not replaced.
        **save_kwargs: passed to `save_pretrained` (variant, max_shard_size, ...).

    Returns:
        huggingface_hub's CommitInfo of the upload.
    """
    from huggingface_hub import HfApi

    if not _plans(pipe):
        raise ValueError(
            "this pipeline has no dq-quantized component; quantize it first with dq.quantize(pipe, ...)"
        )
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="dq-push-") as tmp:
        folder = Path(local_dir) if local_dir is not None else Path(tmp) / "repo"
        save_pretrained(pipe, folder, **save_kwargs)
        readme = folder / "README.md"
        # a README.md the user wrote in local_dir is theirs: only dq's own card is replaced
        if not readme.exists() or _CARD_MARK in readme.read_text(encoding="utf-8", errors="replace"):
            readme.write_text(model_card(pipe, repo_id), encoding="utf-8")
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=getattr(repo, "repo_id", repo_id),
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload dq-quantized {type(pipe).__name__}",
            create_pr=create_pr,
        )
