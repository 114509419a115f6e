"""Metric code: FID, CLIP score, attribute accuracy, reference metrics (embedded evaluators)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dq.assets  # noqa: E402
from dq import metrics, world  # noqa: E402


@pytest.fixture(scope="module")
def ev():
    return dq.assets.load_evaluators()


@pytest.fixture(scope="module")
def heldout():
    imgs, labels = world.images_and_labels(200, "heldout", seed=5)
    rows = [{n: world.VALUES[n][i] for n, i in zip(world.ATTRIBUTES, row, strict=True)} for row in labels]
    return torch.from_numpy(imgs), rows


class RandomFeatures(nn.Module):
    """A fixed random conv net: uint8 images -> 16 features (metric code needs no weights)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 5, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.num_features = 16

    def forward(self, x):
        return self.net(x.float() / 255)


@pytest.mark.parametrize("feature", ["random", "embedded"])
def test_fid_self_near_zero_noise_large(feature, ev, heldout):
    f = RandomFeatures() if feature == "random" else ev.fid_feature
    imgs = heldout[0]
    noise = torch.randint(
        0, 256, imgs.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    same = metrics.fid(imgs, imgs, feature=f)
    other_real = torch.from_numpy(world.images_and_labels(200, "heldout", seed=6)[0])
    real_real = metrics.fid(imgs, other_real, feature=f)
    vs_noise = metrics.fid(imgs, noise, feature=f)
    assert abs(same) < 1e-3
    assert vs_noise > 20 * max(real_real, 1e-3)


def test_clip_score_prefers_matching_captions(ev):
    n = 128
    imgs, caps = [], []
    for i in range(n):
        img, cap, _ = world.sample(i, "heldout", seed=2, drop=0.0)
        imgs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
        caps.append(cap)
    imgs = torch.stack(imgs)
    shuffled = caps[1:] + caps[:1]
    kw = dict(model=ev.clip_model, preprocess=ev.clip_preprocess, tokenizer=ev.clip_tokenizer)
    right, wrong = metrics.clip_score(imgs, caps, **kw), metrics.clip_score(imgs, shuffled, **kw)
    assert right > wrong + 5, (right, wrong)


def test_attribute_classifier_accuracy_on_world_images(ev, heldout):
    acc = metrics.attribute_accuracy(heldout[0], heldout[1], ev.classifier, ev.values)
    assert set(acc) == set(world.ATTRIBUTES) | {"all"}
    assert min(acc[k] for k in world.ATTRIBUTES) >= 0.95, acc


def test_attribute_accuracy_counts_only_named_attributes(ev, heldout):
    imgs, labels = heldout
    wrong = [{**lab, "colour": "pink" if lab["colour"] != "pink" else "red"} for lab in labels[:50]]
    acc = metrics.attribute_accuracy(imgs[:50], [{"colour": lab["colour"]} for lab in wrong],
                                     ev.classifier, ev.values)  # fmt: skip
    assert set(acc) == {"colour", "all"} and acc["colour"] < 0.1


@pytest.mark.parametrize("name", ["psnr", "ssim", "feature"])
def test_reference_metrics_identity_and_damage(name, ev, heldout):
    x = metrics.to_float(heldout[0][:64])
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    fn = {
        "psnr": metrics.psnr_vs_reference,
        "ssim": metrics.ssim_vs_reference,
        "feature": lambda a, b: -metrics.feature_distance_vs_reference(a, b, ev.fid_feature),
    }[name]
    assert fn(x, x) > fn(noisy, x)
    if name == "ssim":
        assert fn(x, x) == pytest.approx(1.0, abs=1e-3)


def test_bad_image_shape_raises_with_fix():
    with pytest.raises(ValueError, match="output_type='pt'"):
        metrics.psnr_vs_reference(torch.rand(3, 32, 32), torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="one per image"):
        metrics.attribute_accuracy(torch.rand(2, 3, 32, 32), [{}], nn.Identity(), {})
