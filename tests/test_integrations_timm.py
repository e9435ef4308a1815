"""``SigmoidAttention``, the drop-in for timm's ViT attention.

Without timm: the layer equals the formula computed here from its own weights (default and fixed bias,
masks, qk-norm and gating), and keeps timm's parameter names. With timm (it needs torchvision, so these
tests skip where timm cannot be imported): ``timm.create_model(..., attn_layer=SigmoidAttention)`` loads a
state dict saved from the stock ViT, strictly, and the model equals the stock model with its attention
replaced by the formula.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sigattn.integrations.timm import SigmoidAttention


def formula(attn: nn.Module, x: torch.Tensor, bias: float | None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """sigmoid(q.k / sqrt(D) + bias) v with the module's projections, norms and gate; bias None = -log N."""
    batch, tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)
    q, k, v = qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = -math.log(tokens) if bias is None else bias
    weights = torch.sigmoid(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias)
    if allowed is not None:
        weights = weights * allowed
    out = attn.norm((weights @ v).transpose(1, 2).reshape(batch, tokens, heads * head_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * torch.sigmoid(x @ attn.gate.weight.T + (attn.gate.bias if attn.gate.bias is not None else 0))
    return attn.proj(out)


def tokens(batch=2, n=11, dim=32):
    return torch.randn(batch, n, dim, dtype=torch.float64)


@pytest.mark.parametrize(
    "options",
    [dict(qkv_bias=True), dict(qk_norm=True, scale_norm=True, gated=True, norm_layer=nn.LayerNorm)],
    ids=["plain", "qknorm-scalenorm-gated"],
)
@pytest.mark.parametrize("bias", [None, -1.5], ids=["bias-logN", "bias-fixed"])
def test_layer_equals_the_formula(options, bias):
    layer_class = SigmoidAttention if bias is None else SigmoidAttention.with_bias(bias)
    attn = layer_class(32, num_heads=4, **options).double()
    for module in attn.modules():  # LayerNorm starts at (1, 0); make the norms do something
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
    x = tokens()
    torch.testing.assert_close(attn(x), formula(attn, x, bias), atol=1e-12, rtol=1e-12)


def test_masks_keep_their_sdpa_meaning():
    attn = SigmoidAttention(32, num_heads=4, qkv_bias=True).double()
    x = tokens()
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(x, is_causal=True), formula(attn, x, None, causal), atol=1e-12, rtol=1e-12)
    keys = torch.rand(2, 1, 1, 11) > 0.3
    torch.testing.assert_close(attn(x, attn_mask=keys), formula(attn, x, None, keys), atol=1e-12, rtol=1e-12)


def test_parameter_names_are_timms():
    assert set(SigmoidAttention(32, num_heads=4, qkv_bias=True).state_dict()) == {
        "qkv.weight",
        "qkv.bias",
        "proj.weight",
        "proj.bias",
    }
    names = set(
        SigmoidAttention(32, 4, qk_norm=True, scale_norm=True, gated=True, norm_layer=nn.LayerNorm).state_dict()
    )
    assert {"q_norm.weight", "k_norm.bias", "norm.weight", "gate.weight", "qkv.weight"} <= names


def test_attention_dropout_applies_in_training_only(monkeypatch):
    """attn_drop reaches the kernels as dropout_p in training (timm's fused path), 0 in evaluation; a
    training call is reproducible under torch.manual_seed and differs from the evaluation output."""
    import sigattn.integrations.timm as timm_module

    attn = SigmoidAttention(32, 4, attn_drop=0.25).double()
    x = tokens()
    passed = []
    original = timm_module.scaled_dot_product_sigmoid_attention
    monkeypatch.setattr(
        timm_module,
        "scaled_dot_product_sigmoid_attention",
        lambda *args, **kwargs: passed.append(kwargs["dropout_p"]) or original(*args, **kwargs),
    )
    attn.eval()
    torch.testing.assert_close(attn(x), formula(attn, x, None))
    attn.train()
    torch.manual_seed(3)
    first = attn(x)
    torch.manual_seed(3)
    torch.testing.assert_close(attn(x), first, rtol=0, atol=0)
    assert not torch.allclose(first, formula(attn, x, None))
    assert passed == [0.0, 0.25, 0.25]


def test_bad_arguments_are_named():
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"attn_drop must be in \[0, 1\)"):
            SigmoidAttention(32, attn_drop=bad)
    with pytest.raises(ValueError, match="norm_layer is required"):
        SigmoidAttention(32, qk_norm=True)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        SigmoidAttention(30, num_heads=4)
    for kwargs, message in [
        ({"dim": 32, "num_heads": 0}, "num_heads must be a positive int, got 0"),
        ({"dim": 0}, "dim must be a positive int, got 0"),
        ({"dim": 32, "attn_head_dim": -8}, "attn_head_dim must be a positive int, got -8"),
    ]:
        with pytest.raises(ValueError, match=message):
            SigmoidAttention(**kwargs)
    for bad in (float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="bias must be a finite number"):
            SigmoidAttention.with_bias(bad)


# --------------------------------------------------------------------------------------- with timm


def _timm():
    try:
        import timm
    except ImportError as error:  # timm imports torchvision, which some platforms lack
        pytest.skip(f"timm cannot be imported here: {error}")
    return timm


VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)


def test_timm_vit_loads_the_stock_checkpoint_and_equals_the_formula():
    timm = _timm()
    torch.manual_seed(0)
    stock = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT).double().eval()
    ours = timm.create_model("vit_tiny_patch16_224", pretrained=False, attn_layer=SigmoidAttention, **VIT)
    ours.load_state_dict(stock.state_dict(), strict=True)
    ours = ours.double().eval()
    assert all(isinstance(block.attn, SigmoidAttention) for block in ours.blocks)

    for block in stock.blocks:  # the stock model with the formula in place of softmax attention
        block.attn.forward = lambda x, attn_mask=None, is_causal=False, attn=block.attn: formula(attn, x, None)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(images), stock(images), atol=1e-10, rtol=1e-10)


def test_timm_create_model_takes_a_fixed_bias():
    timm = _timm()
    layer = SigmoidAttention.with_bias(-2.0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, attn_layer=layer, **VIT)
    assert all(type(block.attn) is layer and block.attn.logit_bias == -2.0 for block in model.blocks)
