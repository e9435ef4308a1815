"""sigattn.models: the GPT and the ViT: shapes, loss, causality, other context lengths, the attention switch,
activation checkpointing and configuration errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sigattn.models import GPT, GPTConfig, ViT, ViTConfig


def small_gpt(**kwargs) -> GPT:
    options = dict(vocab_size=37, block_size=16, n_layer=2, d_model=32, n_head=4)
    return GPT(GPTConfig(**(options | kwargs)))


@pytest.mark.parametrize("attn", ["sigmoid", "softmax"])
@pytest.mark.parametrize("pos", ["rope", "alibi", "sinusoidal", "none"])
def test_gpt_is_causal_and_runs_at_other_lengths(attn, pos):
    model = small_gpt(attn=attn, pos=pos).eval()
    idx = torch.randint(0, 37, (2, 16))
    logits, loss = model(idx)
    assert logits.shape == (2, 16, 37) and loss is None
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 37
    torch.testing.assert_close(model(changed)[0][:, :10], logits[:, :10])
    assert not torch.allclose(model(changed)[0][:, 10:], logits[:, 10:])
    longer, _ = model(torch.randint(0, 37, (1, 40)))  # past block_size: positions are not a table
    assert longer.shape == (1, 40, 37) and bool(torch.isfinite(longer).all())


def test_gpt_loss_is_the_mean_cross_entropy():
    model = small_gpt()
    idx, targets = torch.randint(0, 37, (3, 16)), torch.randint(0, 37, (3, 16))
    logits, loss = model(idx, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 37), targets.reshape(-1)))
    # at initialisation the predictions are near uniform
    assert abs(loss.item() - math.log(37)) < 0.5
    empty = torch.zeros(0, 16, dtype=torch.long)  # an empty batch (a last shard, say) is a batch too
    logits, loss = model(empty, empty)
    assert logits.shape == (0, 16, 37) and loss.isnan()  # cross_entropy's mean over nothing


def test_one_model_trains_either_way():
    """sigmoid and softmax models have the same parameters; a state dict moves between them."""
    sig, soft = small_gpt(attn="sigmoid", qk_norm="layernorm"), small_gpt(attn="softmax", qk_norm="layernorm")
    assert sig.state_dict().keys() == soft.state_dict().keys()
    soft.load_state_dict(sig.state_dict())
    idx = torch.randint(0, 37, (2, 16))
    assert not torch.allclose(sig(idx)[0], soft(idx)[0])  # same weights, different attention


def test_tied_embeddings_and_init():
    model = small_gpt(n_layer=3)
    assert model.lm_head.weight is model.wte.weight
    untied = small_gpt(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight
    proj_std = model.blocks[0].attn.proj.weight.std().item()
    assert 0.5 * 0.02 / math.sqrt(6) < proj_std < 1.5 * 0.02 / math.sqrt(6)  # GPT-2's residual scaling


@pytest.mark.parametrize("attn", ["sigmoid", "softmax"])
def test_activation_checkpointing_gives_the_same_gradients(attn):
    torch.manual_seed(1)
    model = small_gpt(attn=attn, dropout=0.0)
    idx, targets = torch.randint(0, 37, (2, 16)), torch.randint(0, 37, (2, 16))
    model(idx, targets)[1].backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(idx, targets)[1].backward()
    for a, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)


def test_generate_appends_tokens():
    model = small_gpt().eval()
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), 6, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 9) and bool((out >= 0).all()) and bool((out < 37).all())
    prompt = torch.zeros(2, 3, dtype=torch.long)
    for kwargs, message in [
        ({"num_tokens": -1}, "num_tokens must be an int >= 0, got -1"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"idx": prompt[:, :0]}, r"idx must be \(batch, S0\) token ids with S0 >= 1, got shape \(2, 0\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.generate(**({"idx": prompt, "num_tokens": 2} | kwargs))


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("attn", ["sigmoid", "softmax"])
def test_vit_shapes_and_loss(pool, attn):
    config = ViTConfig(d_model=32, n_head=4, n_layer=2, image_size=8, patch_size=2, n_classes=5, pool=pool, attn=attn)
    model = ViT(config)
    assert config.num_patches == 16 and config.seqlen == 16 + (pool == "cls")
    assert model.blocks[0].attn.fixed_bias == pytest.approx(-math.log(config.seqlen))
    assert model.blocks[0].attn.causal is False
    images, labels = torch.rand(3, 1, 8, 8), torch.tensor([0, 4, 2])
    logits, loss = model(images, labels)
    assert logits.shape == (3, 5)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    assert model(images[:0])[0].shape == (0, 5)


def test_vit_patches_are_row_major():
    model = ViT(ViTConfig(d_model=16, n_head=2, n_layer=1, image_size=4, patch_size=2, channels=2))
    images = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 2, 4, 4)
    patches = model.patchify(images)
    assert patches.shape == (2, 4, 8)
    # patch 1 of image 0 is rows 0-1, columns 2-3, channel 0 then channel 1
    want = torch.cat([images[0, c, 0:2, 2:4].reshape(-1) for c in range(2)])
    torch.testing.assert_close(patches[0, 1], want)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 2, 4, 4\), got \(2, 1, 4, 4\)"):
        model.patchify(torch.rand(2, 1, 4, 4))


def test_vit_predictions_do_not_depend_on_batch_neighbours():
    model = ViT(ViTConfig(d_model=16, n_head=2, n_layer=1)).eval()
    images = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(model(images)[0][:2], model(images[:2])[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GPTConfig(vocab_size=0), "vocab_size must be a positive int, got 0"),
        (lambda: GPTConfig(n_layer=-1), "n_layer must be a positive int, got -1"),
        (lambda: ViTConfig(image_size=9, patch_size=2), r"image_size \(9\) must be a multiple of patch_size"),
        (lambda: ViTConfig(pool="max"), "pool must be one of 'cls', 'mean'; got 'max'"),
    ],
)
def test_bad_model_settings_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()
