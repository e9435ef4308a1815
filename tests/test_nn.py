"""sigattn.nn: the attention module against formulas written out here (sigmoid: the float64 reference of
sigattn; softmax: an explicit softmax), for every position encoding, QK-norm and bias option, GQA; the
block's norm styles and LayerScale; the MLPs; RoPE, ALiBi and sinusoidal positions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from sigattn.nn import (
    MLP,
    BlockConfig,
    SigmoidAttention,
    TransformerBlock,
    alibi_slopes,
    apply_rope,
    rope_angles,
    sinusoidal_positions,
)
from sigattn.ops.sigmoid_attn.reference import sigmoid_attn_reference

TRAIN_LEN, TEST_LEN = 16, 11  # the module is built for 16 tokens and run on 11: the bias stays -log(16)


@dataclass(frozen=True)
class AttnCase:
    attn: str = "sigmoid"
    pos: str = "none"
    qk_norm: str = "none"
    attn_bias: str = "fixed"
    bias_init: float | None = None
    heads: int = 4
    kv_heads: int | None = None
    causal: bool = True

    @property
    def id(self) -> str:
        kv = f"-Hkv{self.kv_heads}" if self.kv_heads else ""
        bias = f"-bias{self.bias_init}" if self.bias_init is not None else ""
        mask = "causal" if self.causal else "full"
        return f"{self.attn}-{self.pos}-qk{self.qk_norm}-{self.attn_bias}{bias}-H{self.heads}{kv}-{mask}"

    def config(self) -> BlockConfig:
        return BlockConfig(
            d_model=8 * self.heads,
            n_head=self.heads,
            n_kv_head=self.kv_heads,
            attn=self.attn,
            pos=self.pos,
            qk_norm=self.qk_norm,
            attn_bias=self.attn_bias,
            bias_init=self.bias_init,
        )


CASES = [
    AttnCase(),
    AttnCase(pos="rope"),
    AttnCase(pos="alibi"),
    AttnCase(pos="sinusoidal", causal=False),
    AttnCase(qk_norm="layernorm", pos="rope"),
    AttnCase(qk_norm="rmsnorm", pos="alibi", causal=False),
    AttnCase(attn_bias="learnable", pos="rope"),
    AttnCase(bias_init=-1.5),
    AttnCase(heads=6, kv_heads=2, pos="alibi", qk_norm="rmsnorm"),
    AttnCase(heads=4, kv_heads=1, pos="rope", attn_bias="learnable"),
]
SOFTMAX_CASES = [
    AttnCase(attn="softmax"),
    AttnCase(attn="softmax", pos="rope", qk_norm="layernorm"),
    AttnCase(attn="softmax", pos="alibi"),
    AttnCase(attn="softmax", pos="alibi", causal=False, qk_norm="rmsnorm"),
    AttnCase(attn="softmax", heads=6, kv_heads=3, pos="rope"),
]


def make_module(case: AttnCase) -> SigmoidAttention:
    module = SigmoidAttention(case.config(), TRAIN_LEN, case.causal).double()
    with torch.no_grad():  # non-trivial norm gains and per-head biases
        for norm in (module.q_norm, module.k_norm):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
                if getattr(norm, "bias", None) is not None:
                    norm.bias.uniform_(-0.2, 0.2)
        if module.head_bias is not None:
            module.head_bias.copy_(torch.linspace(-3.0, 0.5, case.heads))
    return module


# ------------------------------------------------------------------- the formulas, written out


def manual_rope(x: torch.Tensor) -> torch.Tensor:
    """Rotates (x_i, x_{i + D/2}) as the complex number x_i + 1j x_{i + D/2} by pos * 10000^(-2i/D)."""
    _, seqlen, _, dim = x.shape
    half = dim // 2
    freqs = 10000.0 ** (-2.0 * torch.arange(half, dtype=torch.float64) / dim)
    angles = torch.arange(seqlen, dtype=torch.float64)[:, None] * freqs  # [S, D/2]
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angles), angles)[:, None]
    return torch.cat((z.real, z.imag), dim=-1)


def manual_norm(x: torch.Tensor, norm: torch.nn.Module | None, kind: str) -> torch.Tensor:
    if kind == "layernorm":
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias
    if kind == "rmsnorm":
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    return x


def manual_qkv(module: SigmoidAttention, case: AttnCase, x: torch.Tensor):
    batch, seqlen, _ = x.shape
    d = module.head_dim
    hq, hkv = case.heads, case.kv_heads or case.heads
    qkv = x @ module.qkv.weight.T
    q = qkv[..., : hq * d].reshape(batch, seqlen, hq, d)
    k = qkv[..., hq * d : (hq + hkv) * d].reshape(batch, seqlen, hkv, d)
    v = qkv[..., (hq + hkv) * d :].reshape(batch, seqlen, hkv, d)
    q, k = manual_norm(q, module.q_norm, case.qk_norm), manual_norm(k, module.k_norm, case.qk_norm)
    if case.pos == "rope":
        q, k = manual_rope(q), manual_rope(k)
    return q, k, v


KNOWN_SLOPES = {  # ALiBi's published slopes
    4: [2**-2, 2**-4, 2**-6, 2**-8],
    6: [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3],
    8: [2.0**-i for i in range(1, 9)],
}


def expected_output(module: SigmoidAttention, case: AttnCase, x: torch.Tensor) -> torch.Tensor:
    q, k, v = manual_qkv(module, case, x)
    batch, seqlen, hq, d = q.shape
    slopes = torch.tensor(KNOWN_SLOPES[hq], dtype=torch.float32) if case.pos == "alibi" else None
    if case.attn == "sigmoid":
        if case.attn_bias == "learnable":
            bias = module.head_bias
        else:
            bias = -math.log(TRAIN_LEN) if case.bias_init is None else case.bias_init
        out = sigmoid_attn_reference(q, k, v, bias=bias, causal=case.causal, alibi_slopes=slopes, upcast=True)
    else:
        group = hq // k.shape[2]
        kr, vr = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        logits = torch.einsum("bihd,bjhd->bhij", q, kr) / math.sqrt(d)
        i, j = torch.arange(seqlen)[:, None], torch.arange(seqlen)[None, :]
        if slopes is not None:
            logits = logits - slopes.double()[:, None, None] * (i - j).abs()
        if case.causal:
            logits = logits.masked_fill(j > i, float("-inf"))
        out = torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), vr)
    return out.reshape(batch, seqlen, hq * d) @ module.proj.weight.T


# --------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES + SOFTMAX_CASES, ids=lambda c: c.id)
def test_attention_module_matches_the_formula(case):
    module = make_module(case)
    x = torch.randn(2, TEST_LEN, module.n_head * module.head_dim, dtype=torch.float64, requires_grad=True)
    got = module(x)
    want = expected_output(module, case, x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # and the gradients (through q, k, v, the norms, RoPE and the learnable bias)
    grads = torch.autograd.grad(got.square().sum(), [x, *module.parameters()])
    want_grads = torch.autograd.grad(want.square().sum(), [x, *module.parameters()], allow_unused=True)
    for name, g, w in zip(["x", *(n for n, _ in module.named_parameters())], grads, want_grads, strict=True):
        torch.testing.assert_close(g, w if w is not None else torch.zeros_like(g), atol=1e-6, rtol=1e-6, msg=name)


def test_sigmoid_module_passes_a_constant_bias_to_sigattn(monkeypatch):
    """The module calls the public sigattn function (kernels on CUDA) with the training bias, never None."""
    import sigattn.nn.attention as attention_module

    seen = {}

    def spy(q, k, v, dropout_p, **options):
        seen.update(options, dropout_p=dropout_p)
        return sigmoid_attn_reference(q, k, v, **options, upcast=False)

    monkeypatch.setattr(attention_module, "sigmoid_attn_func", spy)
    module = SigmoidAttention(BlockConfig(d_model=32, n_head=4), seqlen=64, causal=True)
    module(torch.randn(1, 100, 32))
    assert seen["bias"] == pytest.approx(-math.log(64))
    assert seen["causal"] is True
    assert seen["dropout_p"] == 0.0  # BlockConfig.attn_dropout's default


@pytest.mark.parametrize("attn", ["sigmoid", "softmax"])
def test_gqa_equals_attention_with_repeated_kv_heads(attn):
    """A GQA layer (6 query heads, 2 key/value heads) computes what a 6-head layer computes when its
    key/value projections repeat each of the 2 heads 3 times."""
    gqa = SigmoidAttention(BlockConfig(d_model=48, n_head=6, n_kv_head=2, attn=attn, pos="rope"), 16, True).double()
    mha = SigmoidAttention(BlockConfig(d_model=48, n_head=6, attn=attn, pos="rope"), 16, True).double()
    d = gqa.head_dim
    wq, wk, wv = gqa.qkv.weight.split([6 * d, 2 * d, 2 * d])
    repeat = lambda w: w.reshape(2, d, -1).repeat_interleave(3, dim=0).reshape(6 * d, -1)  # noqa: E731
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([wq, repeat(wk), repeat(wv)]))
        mha.proj.weight.copy_(gqa.proj.weight)
    x = torch.randn(3, 13, 48, dtype=torch.float64)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", [CASES[2], CASES[8], SOFTMAX_CASES[2]], ids=lambda c: c.id)
def test_attention_weights_reproduce_the_output(case):
    """``attention_weights`` (what the sparsity diagnostic reads) times v is the attention output."""
    module = make_module(case)
    x = torch.randn(2, TEST_LEN, module.n_head * module.head_dim, dtype=torch.float64)
    captured = {}
    module.attn_out.register_forward_hook(lambda mod, args, out: captured.setdefault("out", out))
    module(x)
    _, _, v = module.project(x)
    v = v.repeat_interleave(module.n_head // module.n_kv_head, dim=2)
    weights = module.attention_weights(x)
    assert weights.shape == (2, module.n_head, TEST_LEN, TEST_LEN)
    if case.causal:
        assert bool((weights.triu(1) == 0).all())
    torch.testing.assert_close(
        torch.einsum("bhij,bjhd->bihd", weights.double(), v), captured["out"], atol=1e-6, rtol=1e-5
    )


def test_learnable_bias_gets_a_gradient_and_fixed_bias_is_no_parameter():
    learn = SigmoidAttention(BlockConfig(d_model=16, n_head=2, attn_bias="learnable"), 32, True)
    assert learn.head_bias.shape == (2,)
    torch.testing.assert_close(learn.head_bias.detach(), torch.full((2,), -math.log(32)))
    learn(torch.randn(2, 5, 16)).sum().backward()
    assert learn.head_bias.grad is not None and bool(learn.head_bias.grad.abs().gt(0).all())
    fixed = SigmoidAttention(BlockConfig(d_model=16, n_head=2), 32, True)
    assert "head_bias" not in dict(fixed.named_parameters())
    assert fixed.bias == pytest.approx(-math.log(32))


# ------------------------------------------------------------------------------------ block


def block_formula(block: TransformerBlock, style: str, x: torch.Tensor) -> torch.Tensor:
    ls1 = block.ls1.gamma if hasattr(block.ls1, "gamma") else 1.0
    ls2 = block.ls2.gamma if hasattr(block.ls2, "gamma") else 1.0
    if style == "post":
        x = block.norm1(x + ls1 * block.attn(x))
        return block.norm2(x + ls2 * block.mlp(x))
    a = block.attn(block.norm1(x))
    if style == "hybrid":
        a = block.attn_out_norm(a)
    x = x + ls1 * a
    return x + ls2 * block.mlp(block.norm2(x))


@pytest.mark.parametrize("style", ["pre", "post", "hybrid"])
@pytest.mark.parametrize("layerscale", [None, 0.1])
def test_block_norm_styles(style, layerscale):
    config = BlockConfig(d_model=16, n_head=2, norm_style=style, layerscale=layerscale, norm="rmsnorm")
    block = TransformerBlock(config, 8, causal=True).double()
    assert (block.attn_out_norm is not None) == (style == "hybrid")
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    torch.testing.assert_close(block(x), block_formula(block, style, x), atol=1e-12, rtol=1e-12)
    if layerscale is not None:
        torch.testing.assert_close(block.ls1.gamma.detach(), torch.full((16,), 0.1, dtype=torch.float64))
    if style == "post":  # the output is the output of an RMSNorm with unit gain: RMS 1 per token
        torch.testing.assert_close(block(x).pow(2).mean(-1), torch.ones(2, 8, dtype=torch.float64), atol=1e-4, rtol=0)


def test_block_is_causal():
    block = TransformerBlock(BlockConfig(d_model=16, n_head=2, pos="rope"), 8, causal=True)
    x = torch.randn(1, 8, 16)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 3, 16)
    torch.testing.assert_close(block(x)[:, :5], block(y)[:, :5])


def test_mlps():
    x = torch.randn(3, 5, 16)
    gelu = MLP(16, 4.0, "gelu")
    assert gelu.fc.weight.shape == (64, 16)
    torch.testing.assert_close(gelu(x), F.gelu(x @ gelu.fc.weight.T) @ gelu.proj.weight.T)
    swiglu = MLP(16, 4.0, "swiglu")
    hidden = swiglu.proj.weight.shape[1]
    assert hidden % 8 == 0 and hidden == 48  # 2/3 of 64, rounded up to a multiple of 8
    gate, value = (x @ swiglu.fc.weight.T).split(hidden, dim=-1)
    torch.testing.assert_close(swiglu(x), (F.silu(gate) * value) @ swiglu.proj.weight.T)
    with pytest.raises(ValueError, match="mlp must be 'gelu' or 'swiglu'; got 'relu'"):
        MLP(16, 4.0, "relu")


# --------------------------------------------------------------------------------- positions


def test_rope_scores_depend_only_on_the_offset():
    """<rope(q, i), rope(k, j)> is a function of i - j: shifting both positions leaves it unchanged."""
    q, k = torch.randn(1, 1, 1, 32, dtype=torch.float64), torch.randn(1, 1, 1, 32, dtype=torch.float64)
    cos, sin = rope_angles(40, 32, 10000.0)
    cos, sin = cos.double(), sin.double()

    def score(i, j):
        return (apply_rope(q, cos[i : i + 1], sin[i : i + 1]) * apply_rope(k, cos[j : j + 1], sin[j : j + 1])).sum()

    torch.testing.assert_close(score(7, 3), score(30, 26), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(score(7, 3), score(7, 4))
    torch.testing.assert_close(apply_rope(q, cos[:1], sin[:1]), q)  # position 0 is not rotated
    rotated = apply_rope(q, cos[5:6], sin[5:6])
    torch.testing.assert_close(rotated.norm(), q.norm())


@pytest.mark.parametrize("seqlen", [TEST_LEN, 2 * TRAIN_LEN], ids=["inside-the-table", "past-it"])
def test_rope_tables_stay_float32_in_a_cast_module(seqlen):
    """A module cast to bf16 rotates by the float32 angles that rope_angles promises, as past its table."""
    torch.manual_seed(0)
    config = BlockConfig(d_model=32, n_head=4, attn="softmax", pos="rope")
    module = SigmoidAttention(config, TRAIN_LEN, True)
    cos, sin = module.rope.cos.clone(), module.rope.sin.clone()
    module.to(torch.bfloat16)
    assert module.rope.cos.dtype == module.rope.sin.dtype == torch.float32
    torch.testing.assert_close(module.rope.cos, cos, rtol=0, atol=0)
    never_cast = SigmoidAttention(config, TRAIN_LEN, True).to(torch.bfloat16)
    never_cast.load_state_dict(module.state_dict())
    never_cast.rope.cos, never_cast.rope.sin = cos, sin  # set, not cast
    x = torch.randn(2, seqlen, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(module(x), never_cast(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_alibi_slopes_stay_float32_in_a_cast_module(dtype):
    """12 heads: slopes 2^(-8h/12) that bf16 would round; the kernels take float32 slopes."""
    module = SigmoidAttention(BlockConfig(d_model=48, n_head=12, pos="alibi"), TRAIN_LEN, True).to(dtype)
    assert module.alibi_slopes.dtype == torch.float32
    torch.testing.assert_close(module.alibi_slopes, alibi_slopes(12), rtol=0, atol=0)


def test_alibi_slopes_are_the_published_ones():
    for heads, slopes in KNOWN_SLOPES.items():
        got = alibi_slopes(heads)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, torch.tensor(slopes, dtype=torch.float32))


def test_sinusoidal_positions():
    table = sinusoidal_positions(50, 10)
    assert table.shape == (50, 10)
    pos, i = 17, 3
    torch.testing.assert_close(table[pos, 2 * i], torch.tensor(math.sin(pos / 10000 ** (2 * i / 10))))
    torch.testing.assert_close(table[pos, 2 * i + 1], torch.tensor(math.cos(pos / 10000 ** (2 * i / 10))))
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0] * 5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attn": "linear"}, "attn must be one of 'sigmoid', 'softmax'; got 'linear'"),
        ({"pos": "learned"}, "pos must be one of 'rope', 'alibi', 'sinusoidal', 'none'; got 'learned'"),
        ({"qk_norm": "batchnorm"}, "qk_norm must be one of 'none', 'layernorm', 'rmsnorm'; got 'batchnorm'"),
        ({"n_head": 4, "n_kv_head": 3}, r"n_head \(4\) must be a multiple of n_kv_head \(got 3\)"),
        ({"d_model": 30, "n_head": 4}, r"d_model \(30\) must be a multiple of n_head \(got 4\)"),
        ({"d_model": 12, "n_head": 4, "pos": "rope"}, "pos='rope' needs an even head dim"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": "0.1"}, "dropout must be a finite number, got '0.1'"),
        ({"bias_init": float("nan")}, "bias_init must be a finite number, got nan"),
        ({"layerscale": float("inf")}, "layerscale must be a finite number, got inf"),
        ({"rope_base": 0.0}, "rope_base must be a finite number > 0, got 0.0"),
        ({"mlp_ratio": float("nan")}, "mlp_ratio must be a finite number > 0, got nan"),
        ({"d_model": 16, "mlp_ratio": 0.05}, r"mlp_ratio \* d_model must be at least 1 \(the MLP's hidden width\)"),
    ],
)
def test_bad_block_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockConfig(**kwargs)
