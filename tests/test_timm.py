"""timm's vision transformers through the rewrite, against the oracle (``check_model``, the rewritten graphs run
eagerly). Skipped where timm is not installed: the CPU CI installs no timm, whose torchvision dependency has no CPU
build for the pinned torch there. Tiny configs at 32 x 32 (56 x 56 and 64 x 64 for the windowed and pyramid models),
random weights.

What each becomes (the report's reasons name the rest):
- ViT, DeiT, DeiT-3, FlexiViT, EVA-02 (rotary embeddings): every site non-causal retention;
- CaiT's and XCiT's class attention (one query over every token): the decode step, which with one query reads every
  key; XCiT's cross-covariance attention with its per-head temperature folded into the query;
- Twins: its global sub-sampled attention rewritten, its locally-grouped (5-D) attention kept;
- Swin, BEiT and LeViT (learned relative-position biases; LeViT's keys are computed already transposed), MViTv2
  (relative positions added in place into the scores, ``attn[:, :, 1:, 1:] = ...``, which was rewritten into a wrong
  answer before in-place changes were followed): kept.
"""

import pytest
import torch

from retention_compile.testing import check_model

timm = pytest.importorskip("timm")

# name: (create_model keywords, image size, sites (rewritten, kept), whether gradients are compared). CaiT's
# talking-heads bias and XCiT's temperature have gradients that are exactly 0 (a per-row constant before a softmax) or
# come from eps alone (a per-head factor that retention's normalisation cancels): rounding noise on both sides, so
# those two compare outputs only.
MODELS = {
    "vit_tiny_patch16_224": ({"patch_size": 8}, 32, (12, 0), True),
    "deit3_small_patch16_224": ({"patch_size": 8, "depth": 2}, 32, (2, 0), True),
    "flexivit_small": ({"patch_size": 8, "depth": 2}, 32, (2, 0), True),
    "eva02_tiny_patch14_224": ({"patch_size": 8, "depth": 2}, 32, (2, 0), True),
    "cait_xxs24_224": ({"patch_size": 8, "depth": 2}, 32, (2, 0), False),
    "xcit_nano_12_p16_224": ({"depth": 2}, 32, (4, 0), False),
    "twins_svt_small": ({"depths": (2, 2, 2, 2)}, 64, (4, 4), True),
    "swin_tiny_patch4_window7_224": ({"depths": (1, 1, 1, 1)}, 56, (0, 4), True),
    "beit_base_patch16_224": ({"patch_size": 8, "depth": 2}, 32, (0, 2), True),
    "mvitv2_tiny": ({}, 64, (0, 10), True),
    # k already transposed (q @ k, k (B, H, d, T)), read through a transpose since session 63; kept for its learned
    # attention biases. In eval mode LeViT caches those biases with their graph (a second backward fails): outputs only
    "levit_128s": ({}, 64, (0, 11), False),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_model(name):
    keywords, size, (rewritten, kept), grad = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, img_size=size, **keywords).eval()
    images = torch.randn(2, 3, size, size)
    check = check_model(model, images, inductor=False, quiet=True, grad=grad, tol=1e-4, grad_tol=2e-3)
    decisions = [site.decision for site in check.report.sites]
    assert (decisions.count("rewritten"), decisions.count("kept")) == (rewritten, kept), check.report.summary()
    if name == "mvitv2_tiny":
        assert all("changed in place (setitem)" in site.reason for site in check.report.sites)
    if name == "levit_128s":
        assert all("additive bias" in site.reason for site in check.report.sites)
