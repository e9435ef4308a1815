"""The transformers integration on tiny random models (nothing is downloaded).

Every model is checked against a second attention implementation written here from the formula,
``sigmoid(scaling * q k^T + b)`` over the pairs transformers' own (always materialised) masks allow, with GQA
expanded: outputs and every parameter gradient in float64. Generation: with a cache (dynamic and static)
equals without one, and a left-padded batch equals each prompt generated alone (DeepSeek V3's latent attention
among them: values of another head dim than queries and keys). Packed batches, the mask
function's three answers, the bias source and the compiled model (fullgraph, dynamic shapes; static-cache
decode, under CUDA graphs on a GPU) are tested on their own. Last, bf16 models on the Triton kernels
(Triton's interpreter on the CPU): training within the tolerance rule, cached generation as uncached.

On a GPU every test runs there (DEVICE); the float64 tests then use the PyTorch backend on the GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AttentionInterface,
    AttentionMaskInterface,
    BertConfig,
    BertModel,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    ViTConfig,
    ViTModel,
)
from transformers.masking_utils import sdpa_mask  # noqa: E402

import sigattn  # noqa: E402
from sigattn.integrations import transformers as sigmoid_hf  # noqa: E402
from sigattn.ops.sigmoid_attn.reference import sigmoid_attn_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REFERENCE = "sigmoid_test_reference"
VOCAB = 61


# --------------------------------------------------------------------------- the formula, written here


def expected_bias(config, layer_idx, num_heads) -> torch.Tensor:
    """config.sigmoid_attn_bias (float, per layer, per head) or -log(context), as a (heads,) float64."""
    value = getattr(config, "sigmoid_attn_bias", None)
    if value is None:
        n = getattr(config, "max_position_embeddings", None)
        if n is None:  # ViT: patches + class token
            n = (config.image_size // config.patch_size) ** 2 + 1
        value = -math.log(n)
    if isinstance(value, list):
        value = value[layer_idx]
    return torch.as_tensor(value, dtype=torch.float64).expand(num_heads)


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """sigmoid(scaling q.k + b) v over the allowed pairs, float64, GQA expanded."""
    group = query.shape[1] // key.shape[1]
    q, k, v = query.double(), key.double().repeat_interleave(group, 1), value.double().repeat_interleave(group, 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    bias = expected_bias(module.config, getattr(module, "layer_idx", None), query.shape[1]).to(q.device)
    logits = q @ k.transpose(-1, -2) * scale + bias[:, None, None]  # [B, H, Sq, Sk]
    allowed = torch.ones_like(logits, dtype=torch.bool) if attention_mask is None else attention_mask
    out = torch.where(allowed, torch.sigmoid(logits), 0) @ v
    return out.transpose(1, 2).to(query.dtype), None


def materialised_mask(**kwargs):
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(**kwargs)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    sigmoid_hf.register()
    AttentionInterface.register(REFERENCE, reference_attention)
    AttentionMaskInterface.register(REFERENCE, materialised_mask)


# -------------------------------------------------------------------------------------- tiny models

SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=2, vocab_size=VOCAB)
DECODERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=64)),
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(**SMALL, num_key_value_heads=2, max_position_embeddings=64, sigmoid_attn_bias=-2.5)
    ),
    "qwen3": lambda: Qwen3ForCausalLM(
        Qwen3Config(
            **SMALL,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=64,
            sigmoid_attn_bias=[[-1.0, -2.0, -3.0, -4.0], -2.0],
        )
    ),
    # sliding_window=4 < the sequence: the window binds in prefill and in decode.
    "mistral": lambda: MistralForCausalLM(
        MistralConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=64, sliding_window=4)
    ),
    # Multi-head latent attention: queries and keys of 16 + 8 (RoPE) dims, values of 12. Dense MLPs in every
    # layer (first_k_dense_replace): the experts' grouped matmul has no float64.
    "deepseek_v3": lambda: DeepseekV3ForCausalLM(
        DeepseekV3Config(
            **SMALL,
            num_key_value_heads=4,
            max_position_embeddings=64,
            first_k_dense_replace=SMALL["num_hidden_layers"],
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
        )
    ),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(
            n_embd=32,
            n_head=4,
            n_layer=2,
            n_positions=48,
            vocab_size=VOCAB,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        )
    ),
}
ENCODERS = {
    "bert": lambda: BertModel(
        BertConfig(**SMALL, max_position_embeddings=40, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    ),
    "vit": lambda: ViTModel(
        ViTConfig(
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=48,
            num_hidden_layers=2,
            image_size=16,
            patch_size=4,
            attention_probs_dropout_prob=0.0,
            hidden_dropout_prob=0.0,
        )
    ),
}


def make(build, implementation, dtype=torch.float64):
    torch.manual_seed(0)
    model = build().to(DEVICE, dtype)
    model.set_attn_implementation(implementation)
    return model


def inputs(name, batch=3, seqlen=9):
    """Model inputs with padding: left padding for decoders (as in batched generation), right for BERT."""
    gen = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen, dtype=torch.float64).to(DEVICE)}
    ids = torch.randint(1, VOCAB, (batch, seqlen), generator=gen)
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    if name == "bert":
        mask[1, -3:] = 0
    else:
        mask[1, :3] = 0
        mask[2:, :1] = 0
    return {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE)}


def main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", [*DECODERS, *ENCODERS])
def test_model_forward_and_gradients_equal_the_formula(name):
    """Outputs and every parameter gradient of the "sigmoid" model equal the formula's, in float64."""
    build = {**DECODERS, **ENCODERS}[name]
    models = [make(build, impl).train() for impl in ("sigmoid", REFERENCE)]
    batch = inputs(name)
    outs = []
    for model in models:
        out = main_output(model(**batch))
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype).to(DEVICE)
        (out * weights).sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=1e-10)
    reference_params = dict(models[1].named_parameters())
    for pname, param in models[0].named_parameters():
        expected = reference_params[pname].grad
        if expected is None:  # unused by this forward (e.g. a pooler)
            assert param.grad is None or not param.grad.any(), pname
            continue
        torch.testing.assert_close(param.grad, expected, atol=1e-10, rtol=1e-9, msg=lambda m, n=pname: f"{n}: {m}")


# --------------------------------------------------------------------------------------- generation


def generate(model, batch, **kwargs):
    out = model.generate(
        **batch,
        max_new_tokens=6,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("name", list(DECODERS))
def test_generation_with_cache_equals_without(name):
    """Greedy generation of a left-padded batch: dynamic cache, static cache and no cache give the same
    tokens and scores (without cache, every step is a forward the formula test covers). On CUDA transformers
    compiles a static-cache decode by itself; its float32 RMSNorm and rotary arithmetic then round apart from
    eager's (3e-8 on an H100), so compiling is off here and tested on its own below."""
    model = make(DECODERS[name], "sigmoid").eval()
    batch = inputs(name, batch=2, seqlen=7)
    tokens, scores = generate(model, batch, use_cache=True)
    for kwargs in ({"use_cache": False}, {"cache_implementation": "static", "disable_compile": True}):
        other_tokens, other_scores = generate(model, batch, **kwargs)
        assert torch.equal(other_tokens, tokens), kwargs
        torch.testing.assert_close(other_scores, scores, atol=1e-9, rtol=1e-9, msg=lambda m, a=kwargs: f"{a}: {m}")


def test_left_padded_batch_generates_as_each_prompt_alone():
    """Padding keys contribute exactly 0: a left-padded batch generates what each prompt generates alone."""
    model = make(DECODERS["llama"], "sigmoid").eval()
    batch = inputs("llama", batch=3, seqlen=8)
    tokens, scores = generate(model, batch)
    for row in range(3):
        keep = batch["attention_mask"][row].bool()
        alone = {
            "input_ids": batch["input_ids"][row, keep][None],
            "attention_mask": batch["attention_mask"][row, keep][None],
        }
        row_tokens, row_scores = generate(model, alone)
        assert torch.equal(row_tokens[0], tokens[row, -row_tokens.shape[1] :])
        torch.testing.assert_close(row_scores[:, 0], scores[:, row], atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------------------------- packed sequences


def packed_llama_inputs():
    lengths = [5, 3, 6]
    gen = torch.Generator().manual_seed(3)
    ids = [torch.randint(1, VOCAB, (n,), generator=gen) for n in lengths]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, torch.cat(ids)[None], position_ids, cu, max(lengths)


@pytest.mark.parametrize("varlen_kwargs", [True, False], ids=["cu_seq_lens", "position_ids_only"])
def test_packed_batch_equals_separate_sequences(monkeypatch, varlen_kwargs):
    """Packed sequences attend on their own: with cu_seq_lens through sigmoid_attn_varlen_func, with only
    restarting position ids through transformers' block mask."""
    calls = []
    varlen = sigmoid_hf.sigmoid_attn_varlen_func
    monkeypatch.setattr(sigmoid_hf, "sigmoid_attn_varlen_func", lambda *a, **k: calls.append(1) or varlen(*a, **k))
    model = make(DECODERS["llama"], "sigmoid").eval()
    ids, packed, position_ids, cu, longest = packed_llama_inputs()
    kwargs = {"position_ids": position_ids.to(DEVICE), "use_cache": False}  # packing is detected without a cache
    if varlen_kwargs:
        cu = cu.to(DEVICE)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    got = model(packed.to(DEVICE), **kwargs).logits[0]
    expected = torch.cat([model(x[None].to(DEVICE)).logits[0] for x in ids])
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert len(calls) == (2 if varlen_kwargs else 0)  # one call per layer


# ------------------------------------------------------------------------------- the attention function


class FakeAttention(torch.nn.Module):
    def __init__(self, config, is_causal=True, layer_idx=0):
        super().__init__()
        self.config, self.is_causal, self.layer_idx = config, is_causal, layer_idx


def qkv(batch=2, heads=4, kv_heads=2, seqlen_q=3, seqlen_k=7, head_dim=8):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(batch, heads, seqlen_q, head_dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, seqlen_k, head_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v


def flash_reference(q, k, v, **options):
    """sigattn's float64 reference in (B, H, S, D) layout."""
    out = sigmoid_attn_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **options)
    return out


def test_decode_is_bottom_right_aligned_and_gqa_unexpanded(monkeypatch):
    """Fewer queries than keys (chunked prefill / decode against the cache): query i sits at key
    i + Sk - Sq (top-left would hide most of the cache); k and v reach sigattn with their own heads."""
    seen = []
    dense = sigmoid_hf.sigmoid_attn_func
    monkeypatch.setattr(
        sigmoid_hf, "sigmoid_attn_func", lambda q, k, v, **o: seen.append(k.shape) or dense(q, k, v, **o)
    )
    module = FakeAttention(LlamaConfig(max_position_embeddings=50))
    q, k, v = qkv()
    out, weights = sigmoid_hf.sigmoid_attention_forward(module, q, k, v, None, scaling=0.3)
    assert weights is None and seen == [(2, 7, 2, 8)]  # (B, Sk, Hkv, D)
    expected = flash_reference(q, k, v, causal=True, scale=0.3, bias=-math.log(50))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    top_left = flash_reference(q, k, v, causal=True, scale=0.3, bias=-math.log(50), top_left=True)
    assert (out - top_left).abs().max() > 0.1


def test_sliding_window_and_key_mask_map_exactly():
    """sliding_window w: keys i - w + 1 .. i; a 2D key mask and a (B, 1, 1, Sk) mask: masked keys add 0."""
    module = FakeAttention(LlamaConfig(max_position_embeddings=50, sigmoid_attn_bias=-1.5))
    q, k, v = qkv(seqlen_q=7)
    out, _ = sigmoid_hf.sigmoid_attention_forward(module, q, k, v, None, sliding_window=3)
    expected = flash_reference(q, k, v, causal=True, window_size=(2, 0), bias=-1.5)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)

    keys = torch.tensor([[False, True, True, False, True, True, True], [True] * 7])
    out, _ = sigmoid_hf.sigmoid_attention_forward(module, q, k, v, keys)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()[None, None] & keys[:, None, None]
    expected = flash_reference(q, k, v, attn_mask=allowed, bias=-1.5)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)

    q1 = q[:, :, -1:]
    out, _ = sigmoid_hf.sigmoid_attention_forward(module, q1, k, v, keys[:, None, None])
    expected = flash_reference(q1, k, v, attn_mask=keys[:, None, None], bias=-1.5)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("path", ["dense", "mask", "packed"])
def test_attention_dropout_reaches_each_path(path):
    """transformers' ``dropout`` (the module's attention dropout in training) is the dropout_p of the call
    each path makes: the same output as that call under the same seed, reproducible, different from
    dropout 0; a dropout outside [0, 1) raises naming it."""
    module = FakeAttention(LlamaConfig(max_position_embeddings=50, attention_dropout=0.3))
    q, k, v = qkv(batch=1 if path == "packed" else 2, seqlen_q=7)
    bias = -math.log(50)
    kwargs, mask = {}, None
    if path == "packed":
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4)

        def direct(p):
            qp, kp, vp = (t[0].transpose(0, 1) for t in (q, k, v))
            return sigattn.sigmoid_attn_varlen_func(qp, kp, vp, cu, cu, 4, 4, p, bias=bias, causal=True)[None]
    elif path == "mask":
        mask = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].expand(2, 1, 7, 7)

        def direct(p):
            out = sigattn.scaled_dot_product_sigmoid_attention(q, k, v, mask, p, bias=bias, enable_gqa=True)
            return out.transpose(1, 2)
    else:

        def direct(p):
            return sigattn.sigmoid_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), p, bias=bias, causal=True)

    def call(p):
        torch.manual_seed(11)
        return sigmoid_hf.sigmoid_attention_forward(module, q, k, v, mask, dropout=p, **kwargs)[0]

    torch.manual_seed(11)
    expected = direct(0.3)
    torch.testing.assert_close(call(0.3), expected, rtol=0, atol=0)
    torch.testing.assert_close(call(0.3), expected, rtol=0, atol=0)
    assert (call(0.0) - expected).abs().max() > 1e-3
    with pytest.raises(ValueError, match="dropout_p"):
        call(1.0)


def test_unsupported_options_raise_naming_them():
    module = FakeAttention(LlamaConfig())
    q, k, v = qkv()
    with pytest.raises(ValueError, match="softcap"):
        sigmoid_hf.sigmoid_attention_forward(module, q, k, v, None, softcap=30.0)
    with pytest.raises(ValueError, match=r"\(batch, kv_length\) = \(2, 7\)"):
        sigmoid_hf.sigmoid_attention_forward(module, q, k, v, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="one batch row"):
        cu = torch.tensor([0, 3], dtype=torch.int32)
        sigmoid_hf.sigmoid_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=3, max_length_k=3)


# ----------------------------------------------------------------------------------- the mask function


def mask_args(**overrides):
    args = dict(batch_size=2, q_length=4, kv_length=4, q_offset=0, kv_offset=0, attention_mask=None)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "case,overrides,expected",
    [
        ("prefill", {}, None),
        ("dynamic_cache_decode", dict(q_length=1, kv_length=6, q_offset=5), None),
        ("left_padding", dict(attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])), "2d"),
        ("padding_chunk", dict(q_length=2, kv_length=6, q_offset=4, attention_mask=torch.ones(2, 6)), None),
        ("static_cache", dict(q_length=1, kv_length=8, q_offset=torch.tensor(3)), "4d"),
        ("window_binds", dict(local_size=3), "4d"),
        ("window_short", dict(local_size=5), None),
        ("no_skip", dict(allow_is_causal_skip=False), "4d"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_mask_function_answers(case, overrides, expected):
    """None when the bottom-right causal pattern is implied, a key mask with padding, else materialised (and
    then equal to transformers' own mask)."""
    args = mask_args(**overrides)
    got = sigmoid_hf.sigmoid_attention_mask(**args)
    if expected is None:
        assert got is None
    elif expected == "2d":
        assert torch.equal(got, args["attention_mask"].bool())
    else:
        assert torch.equal(got, materialised_mask(**args))


# ---------------------------------------------------------------------------------------------- bias


def test_bias_comes_from_the_config():
    assert sigmoid_hf.config_bias(LlamaConfig(max_position_embeddings=2048)) == -math.log(2048)
    assert sigmoid_hf.config_bias(GPT2Config(n_positions=1024)) == -math.log(1024)
    assert sigmoid_hf.config_bias(ViTConfig(image_size=32, patch_size=8)) == -math.log(17)
    assert sigmoid_hf.config_bias(LlamaConfig(sigmoid_attn_bias=-3)) == -3.0
    per_head = LlamaConfig(sigmoid_attn_bias=[-1.0, [-2.0, -3.0]])
    assert sigmoid_hf.module_bias(FakeAttention(per_head, layer_idx=1), 2) == (-2.0, -3.0)
    assert sigmoid_hf.module_bias(FakeAttention(per_head, layer_idx=0), 2) == -1.0
    with pytest.raises(ValueError, match="2 per-head values, the layer has 4 heads"):
        sigmoid_hf.module_bias(FakeAttention(per_head, layer_idx=1), 4)
    with pytest.raises(ValueError, match="config.sigmoid_attn_bias must be"):
        sigmoid_hf.config_bias(LlamaConfig(sigmoid_attn_bias="large"))
    with pytest.raises(ValueError, match="set config.sigmoid_attn_bias"):
        sigmoid_hf.config_bias(transformers.PreTrainedConfig())


def test_per_head_bias_reaches_the_kernel_call():
    """A per-head bias from the config equals the formula with that bias (Qwen3 above covers models)."""
    module = FakeAttention(LlamaConfig(sigmoid_attn_bias=[[-1.0, -2.0, -0.5, -4.0]]), layer_idx=0)
    q, k, v = qkv(seqlen_q=7)
    out, _ = sigmoid_hf.sigmoid_attention_forward(module, q, k, v, None)
    bias = torch.tensor([-1.0, -2.0, -0.5, -4.0], dtype=torch.float64)
    torch.testing.assert_close(out, flash_reference(q, k, v, causal=True, bias=bias), atol=1e-12, rtol=1e-12)


# -------------------------------------------------------------------------------------------- compile

KERNEL_DTYPE = torch.bfloat16
COMPILE_BACKEND = "inductor" if DEVICE == "cuda" else "eager"


def assert_compiled_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    if COMPILE_BACKEND == "eager":  # the same ops in the same order
        torch.testing.assert_close(got, expected)
    else:  # inductor fuses the norms and rotary embedding: bf16 rounds differently (H100: 2.4e-3)
        torch.testing.assert_close(got, expected, rtol=0, atol=4 * 2**-8 * expected.abs().max().item())


def test_compiled_forward_equals_eager():
    """fullgraph=True, dynamic shapes, on the Triton kernels (Triton's interpreter on the CPU): the padded
    batch takes the key-mask path (no mask values are read while tracing), at two sequence lengths."""
    model = make(DECODERS["llama"], "sigmoid", KERNEL_DTYPE).eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=COMPILE_BACKEND)
    with sigattn.use_backend("triton"), torch.no_grad():
        for seqlen in (6, 9):
            batch = inputs("llama", batch=2, seqlen=seqlen)
            assert_compiled_close(compiled(**batch).logits, model(**batch).logits)


def static_cache_decode(model, batch, steps, step_fn):
    """Prefill eagerly into a StaticCache, then decode with step_fn; the per-step logits. The tokens fed are
    fixed (teacher forcing): greedy choices could differ between two runs on a near tie and then compare
    different sequences."""
    from transformers import StaticCache

    ids, mask = batch["input_ids"], batch["attention_mask"]
    batch_size, prompt = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps)
    full_mask = torch.zeros(batch_size, prompt + steps, dtype=mask.dtype, device=mask.device)
    full_mask[:, :prompt] = mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with sigattn.use_backend("auto"):  # a 4D prefill mask: the PyTorch backend
        logits = model(ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache).logits[:, -1]
    out = [logits]
    position = positions[:, -1:]
    tokens = torch.randint(VOCAB, (batch_size, steps - 1), generator=torch.Generator().manual_seed(3)).to(ids.device)
    for step in range(steps - 1):
        token = tokens[:, step : step + 1]
        full_mask[:, prompt + step] = 1
        position = position + 1
        out.append(step_fn(token, full_mask.clone(), position, cache)[:, -1].clone())
    return torch.stack(out)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"] if DEVICE == "cuda" else [None])
def test_compiled_static_cache_decode_equals_eager(mode):
    """Decode against a static cache, compiled with fullgraph=True (and CUDA graphs on a GPU): each step's
    position lives in device tensors, so replaying the graph at later positions matches eager decoding."""
    model = make(DECODERS["llama"], "sigmoid", KERNEL_DTYPE).eval()
    batch = inputs("llama", batch=2, seqlen=5)

    def step(token, mask, position, cache):
        return model(token, attention_mask=mask, position_ids=position, past_key_values=cache).logits

    options = {"mode": mode} if mode else {"backend": COMPILE_BACKEND}
    compiled_step = torch.compile(step, fullgraph=True, **options)
    with torch.no_grad(), sigattn.use_backend("triton"):
        eager = static_cache_decode(model, batch, 5, step)
        compiled = static_cache_decode(model, batch, 5, compiled_step)
    assert_compiled_close(compiled, eager)


@pytest.mark.skipif(DEVICE != "cuda", reason="transformers compiles generate's decode on CUDA")
def test_generate_compiled_with_cuda_graphs_equals_eager():
    from transformers import CompileConfig

    model = make(DECODERS["llama"], "sigmoid", KERNEL_DTYPE).eval()
    batch = inputs("llama", batch=2, seqlen=7)
    eager_tokens, _ = generate(model, batch, cache_implementation="static", disable_compile=True)
    config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    tokens, _ = generate(model, batch, cache_implementation="static", compile_config=config)
    assert torch.equal(tokens, eager_tokens)


# ----------------------------------------------------------------------------- on the kernels, in bf16


def max_error(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


# llama: causal, GQA, left padding (the key-mask path); bert: bidirectional, right padding; deepseek_v3: values
# of another head dim than queries and keys.
@pytest.mark.parametrize("name", ["llama", "bert", "deepseek_v3"])
def test_kernels_train_within_twice_the_bf16_formula_error(name):
    """bf16 on the Triton kernels (forced; Triton's interpreter on the CPU): the output and the attention
    parameters' gradients are within 2x the error of the same bf16 model running the formula in float64,
    plus 4 bf16 ulps of the largest value (both against float64; rounding differences compound through
    the layers, so the op-level rule alone is too tight for a whole model)."""
    build = {**DECODERS, **ENCODERS}[name]
    batch = inputs(name)
    results = {}
    for key, implementation, dtype in (
        ("kernels", "sigmoid", KERNEL_DTYPE),
        ("bf16", REFERENCE, KERNEL_DTYPE),
        ("truth", REFERENCE, torch.float64),
    ):
        model = make(build, implementation, dtype).train()
        args = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
        with sigattn.use_backend("triton" if key == "kernels" else "auto"):
            out = main_output(model(**args))
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
            (out * weights).float().sum().backward()
        attention = {n: p.grad for n, p in model.named_parameters() if "attn" in n or "attention" in n}
        results[key] = (out.detach(), attention)
    truth_out, truth_grads = results["truth"]
    pairs = [("out", results["kernels"][0], results["bf16"][0], truth_out)]
    pairs += [(n, results["kernels"][1][n], results["bf16"][1][n], g) for n, g in truth_grads.items()]
    for label, ours, base, truth in pairs:
        slack = 2**-6 * truth.abs().max().item()
        assert max_error(ours, truth) <= 2 * max_error(base, truth) + slack, label


def test_kernels_generate_with_cache_as_without():
    """bf16 greedy generation with a cache on the kernels; the scores of each step equal a forward without
    cache over the generated sequence (teacher forcing), within bf16 rounding."""
    model = make(DECODERS["llama"], "sigmoid", KERNEL_DTYPE).eval()
    batch = inputs("llama", batch=2, seqlen=7)
    with sigattn.use_backend("triton"), torch.no_grad():
        tokens, scores = generate(model, batch, use_cache=True)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(tokens[:, 7:])], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows
        logits = model(tokens, attention_mask=mask, position_ids=positions, use_cache=False).logits
    logits = logits[:, 6:-1].transpose(0, 1)  # the scores of steps 1..6
    torch.testing.assert_close(logits.float(), scores.float(), atol=3e-2, rtol=3e-2)
