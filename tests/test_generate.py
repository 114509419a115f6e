"""`dq.generate`: one loop, one seeding rule (prompt i uses seed + i, whatever the batch size)."""

import pytest
import torch

from dq.generate import Sampling, generate


def test_images_do_not_depend_on_batch_size_or_sharding(tiny_sd):
    prompts = ["a red circle", "a blue square", "a green triangle"]
    s = Sampling(num_inference_steps=2, guidance_scale=2.0, seed=5)
    a = generate(tiny_sd, prompts, s.replace(batch_size=1))
    b = generate(tiny_sd, prompts, s.replace(batch_size=3))
    c = generate(tiny_sd, prompts[1:], s, first_index=1)  # a shard keeps its seeds
    assert a.shape[0] == 3 and torch.allclose(a, b, atol=1e-5) and torch.allclose(a[1:], c, atol=1e-5)
    d = generate(tiny_sd, prompts, s.replace(seed=6))
    assert not torch.allclose(a, d)


@pytest.mark.parametrize(
    "kwargs,needle",
    [({"num_inference_steps": 0}, "num_inference_steps"), ({"height": 30}, "multiple of 8"),
     ({"batch_size": 0}, "batch_size"), ({"extra": {"generator": 1}}, "sets itself"),
     ({"guidance_scale": float("nan")}, "guidance_scale")],
)
def test_bad_sampling_settings_are_clear_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Sampling(**kwargs)


def test_from_kwargs_sorts_pipeline_arguments():
    s = Sampling.from_kwargs(num_inference_steps=3, negative_prompt="x", seed=2)
    assert s.num_inference_steps == 3 and s.seed == 2 and s.extra == {"negative_prompt": "x"}
    assert s.call_kwargs() == {"num_inference_steps": 3, "negative_prompt": "x"}
