"""torchtitan integration (``sigattn.integrations.torchtitan``), on the CPU.

torchtitan 0.3's ``Trainer`` cannot run without an accelerator (``torchtitan.tools.utils`` falls back to
device type "cuda" when none is found, and the trainer calls ``torch.cuda.set_device``), so the training
test assembles torchtitan's own components the way ``Trainer.train_step`` uses them: the model built from
our registered config, its ``init_weights``, torchtitan's AdamW container, LR schedule, chunked
cross-entropy loss, gradient clipping and ``CheckpointManager`` (DCP, one gloo process), fed by our
``LocalTextDataLoader`` through torchtitan's tokenizer. It checks that the loss falls and that
``sigattn.models.GPT``, converted from the checkpoint written before each step, computes the same loss on
that step's batch; the converted transformers model computes the same logits.

Context parallel runs the torchtitan model under a gloo ``cp`` DeviceMesh of 2 and 4 processes: inputs,
labels and positions are sharded by torchtitan's own ``cp_shard`` (its ``headtail`` load balancer, or
none), the attention runs our ring or Ulysses attention over the mesh's group, and each rank's logits and
the all-reduced gradients are compared with the one-process model. (torchtitan's ``ParallelDims`` builds
its meshes on "cuda", so the trainer's CP wiring, ``SigmoidAttention.parallelize``, is not run here.)
"""

from __future__ import annotations

import json
import math
import os
import random
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("torchtitan", reason="needs torchtitan 0.3 (pip install 'sigattn[torchtitan]')")

from torchtitan.config import ParallelismConfig  # noqa: E402
from torchtitan.distributed import utils as dist_utils  # noqa: E402
from torchtitan.models.common.attention import VarlenMetadata  # noqa: E402

from sigattn import sigmoid_attn_func  # noqa: E402
from sigattn.distributed import shard_sequence  # noqa: E402
from sigattn.integrations.torchtitan import (  # noqa: E402
    FLAVOURS,
    SigmoidAttention,
    build_model_config,
    load_checkpoint,
    resolve_sigmoid_bias,
    sigmoid_attention_config,
    to_gpt,
    to_transformers,
    write_tokenizer_assets,
)
from sigattn.integrations.torchtitan.config_registry import job_config  # noqa: E402
from sigattn.integrations.torchtitan.data import LocalTextDataset, tokenize_rows  # noqa: E402
from sigattn.integrations.torchtitan.model import CP_LAYOUTS, SigmoidLlama3Model  # noqa: E402

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "fast", "slow", "red", "blue", "sky", "tree"]


def make_text(seed: int, documents: int = 120) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60))) for _ in range(documents))


def reference_attention(q, k, v, bias, *, causal, window=(-1, -1)):
    """float64 sigmoid attention of (B, L, H, D) tensors with GQA expanded; bottom-right = top-left (Sq == Sk)."""
    group = q.shape[2] // k.shape[2]
    q, k, v = q.double(), k.double().repeat_interleave(group, 2), v.double().repeat_interleave(group, 2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1]) + bias
    i = torch.arange(q.shape[1])[:, None]
    j = torch.arange(k.shape[1])[None, :]
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window[0] >= 0:
        allowed &= j >= i - window[0]
    if window[1] >= 0:
        allowed &= j <= i + window[1]
    return torch.einsum("bhij,bjhd->bihd", torch.sigmoid(scores) * allowed, v)


# ---------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize(
    "window,causal,ref_window",
    [((-1, 0), True, (-1, -1)), ((-1, -1), False, (-1, -1)), ((5, 0), True, (5, 0)), ((3, 2), False, (3, 2))],
    ids=["causal", "full", "causal-window5", "window3-2"],
)
def test_dense_attention_matches_reference(window, causal, ref_window):
    torch.manual_seed(0)
    attn = sigmoid_attention_config(bias=-2.5, window_size=window).build()
    q = torch.randn(2, 19, 8, 16, requires_grad=True)  # GQA: 8 query heads, 2 KV heads, passed unexpanded
    k = torch.randn(2, 19, 2, 16, requires_grad=True)
    v = torch.randn(2, 19, 2, 16, requires_grad=True)
    out = attn(q, k, v, attention_masks=None, scale=None, enable_gqa=True)
    ref = reference_attention(q, k, v, -2.5, causal=causal, window=ref_window)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-5)


def test_packed_documents_attend_only_to_themselves():
    torch.manual_seed(1)
    attn = sigmoid_attention_config(bias=-3.0).build()
    lengths = [[7, 13, 4], [24]]  # two rows of 24 tokens
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    from torchtitan.models.common.attention import create_varlen_metadata_for_document

    masks = create_varlen_metadata_for_document(positions)
    q, k, v = torch.randn(2, 24, 4, 8), torch.randn(2, 24, 2, 8), torch.randn(2, 24, 2, 8)
    out = attn(q, k, v, attention_masks=masks, scale=0.3)
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            s = slice(start, start + n)
            want = sigmoid_attn_func(
                q[b : b + 1, s], k[b : b + 1, s], v[b : b + 1, s], bias=-3.0, scale=0.3, causal=True
            )
            torch.testing.assert_close(out[b : b + 1, s], want, rtol=1e-6, atol=1e-6)
            start += n


@pytest.mark.parametrize(
    "make,error,pattern",
    [
        (lambda: sigmoid_attention_config().build(), ValueError, r"bias is None \(unresolved\)"),
        (lambda: sigmoid_attention_config(bias=float("nan")), ValueError, r"bias must be a finite float, got nan"),
        (lambda: sigmoid_attention_config(bias=-1.0, window_size=(-2, 0)), ValueError, r"window_size must be a pair"),
        (
            lambda: sigmoid_attention_config(bias=-1.0, context_parallel_method="tree"),
            ValueError,
            r"context_parallel_method must be one of 'ring', 'ulysses', got 'tree'",
        ),
        (lambda: build_model_config("huge"), ValueError, r"flavour must be one of .*got 'huge'"),
        (lambda: build_model_config("debugmodel", "sdpa2"), ValueError, r"attn_backend must be one of .*got 'sdpa2'"),
        (lambda: build_model_config("debugmodel", "flex", bias=-1.0), ValueError, r"bias is a sigmoid attention"),
        (lambda: resolve_sigmoid_bias(build_model_config("debugmodel"), 0), ValueError, r"seq_len .* got 0"),
    ],
    ids=["bias-unresolved", "bias-nan", "window", "cp-method", "flavour", "backend", "softmax-bias", "seq-len"],
)
def test_bad_settings_raise(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


def test_bad_calls_raise():
    attn = sigmoid_attention_config(bias=-1.0).build()
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="out_transform"):
        attn(x, x, x, out_transform=lambda o, lse: o)
    with pytest.raises(TypeError, match="attention_masks must be None or torchtitan's VarlenMetadata.*got dict"):
        attn(x, x, x, attention_masks={"a": None})
    with pytest.raises(TypeError, match="group must be a torch.distributed.ProcessGroup, got str"):
        attn.bind_context_parallel("cp")
    windowed = sigmoid_attention_config(bias=-1.0, window_size=(4, 0)).build()
    with pytest.raises(ValueError, match=r"sliding window \(window_size=\(4, 0\)\) is not supported"):
        windowed.bind_context_parallel(dist.group.WORLD if dist.is_initialized() else _FakeGroup())


class _FakeGroup(dist.ProcessGroup):
    def __init__(self):
        super().__init__(0, 1)


# ---------------------------------------------------------------------------------------------- model config


def _trainer_config(seq_len: int, **parallelism):
    config = job_config("debugmodel", seq_len=seq_len, local_batch_size=2, steps=2, lr=1e-3, warmup_steps=1)
    config.parallelism = ParallelismConfig(**parallelism)
    return config


def test_bias_is_resolved_once_from_the_training_context():
    config = _trainer_config(96)
    model_config = config.model_spec.model
    assert isinstance(model_config, SigmoidLlama3Model.Config)
    model_config.update_from_config(config=config)
    biases = {layer.attention.inner_attention.bias for layer in model_config.layers}
    assert biases == {-math.log(96)}
    explicit = build_model_config("debugmodel", bias=-7.0)
    explicit.update_from_config(config=config)
    assert {layer.attention.inner_attention.bias for layer in explicit.layers} == {-7.0}


@pytest.mark.parametrize("balancer", ["headtail", None])
def test_context_parallel_settings(balancer):
    config = _trainer_config(64, context_parallel_degree=2, context_parallel_load_balancer=balancer)
    model_config = config.model_spec.model
    model_config.update_from_config(config=config)  # stock Llama 3 refuses a varlen-style config with CP
    inner = [layer.attention.inner_attention for layer in model_config.layers]
    assert {cfg.context_parallel_load_balance for cfg in inner} == {CP_LAYOUTS[balancer]}
    # K and V stay sequence-sharded at the inner attention (torchtitan's softmax sharding all-gathers them).
    sharding = inner[0].sharding_config
    assert sharding.in_dst_shardings["k_BLNH"] == sharding.in_src_shardings["k_BLNH"] == sharding.out_src_shardings


@pytest.mark.parametrize(
    "parallelism,pattern",
    [
        ({"context_parallel_load_balancer": "ptrr"}, r"context_parallel_load_balancer must be 'headtail'.*got 'ptrr'"),
        ({"spmd_backend": "partial_dtensor"}, r"needs parallelism.spmd_backend 'spmd_types' or 'full_dtensor'"),
    ],
    ids=["ptrr", "partial-dtensor"],
)
def test_context_parallel_settings_that_cannot_work_raise(parallelism, pattern):
    config = _trainer_config(64, context_parallel_degree=2, **parallelism)
    with pytest.raises(ValueError, match=pattern):
        config.model_spec.model.update_from_config(config=config)


def test_masks_dense_for_single_sequences_varlen_for_packed_rows():
    model_config = build_model_config("debugmodel", bias=-4.0)
    with torch.device("meta"):
        model = model_config.build()
    single = torch.arange(16).expand(3, 16)
    assert model.get_attention_masks(single) is None
    packed = torch.cat([torch.arange(6), torch.arange(10)]).expand(2, 16)
    masks = model.get_attention_masks(packed)
    assert isinstance(masks, VarlenMetadata)
    assert masks.cu_seq_q.tolist() == [0, 6, 16, 22, 32] and masks.max_q == 10


def test_flavour_sizes():
    from torchtitan.models.llama3 import model_registry as llama3_registry

    def count(config):
        with torch.device("meta"):
            model = config.build()
        return sum(p.numel() for p in model.parameters())

    sizes = {name: count(build_model_config(name, bias=-1.0)) for name in FLAVOURS}
    # The debug flavour is torchtitan's own Llama 3 debugmodel with another inner attention.
    assert sizes["debugmodel"] == count(llama3_registry("debugmodel").model)
    assert sizes["100M"] == 100_094_208  # documented as 100.1M (model.py, sigattn/integrations/README.md)


@pytest.mark.parametrize("attn", ["sigmoid", "softmax"])
@pytest.mark.parametrize("size", ["debugmodel", "100m"])
def test_torchtitans_launcher_parses_the_jobs(attn, size):
    """What ``torchrun -m torchtitan.train --module sigattn.integrations.torchtitan --config ...`` parses
    (the trainer itself needs a GPU), with the README's overrides."""
    from torchtitan.config import ConfigManager

    args = ["--module", "sigattn.integrations.torchtitan", "--config", f"{attn}_llama3_{size}"]
    args += ["--dataloader.dataset_path", "train.txt", "--dataloader.no-documents", "--compile.enable"]
    args += ["--parallelism.context_parallel_degree", "2", "--training.seq_len", "512"]
    config = ConfigManager().parse_args(args)
    assert config.dataloader.dataset_path == "train.txt" and config.dataloader.documents is False
    assert config.compile.enable and config.parallelism.context_parallel_degree == 2
    model_config = config.model_spec.model
    assert isinstance(model_config, SigmoidLlama3Model.Config) == (attn == "sigmoid")
    model_config.update_from_config(config=config)
    if attn == "sigmoid":
        assert {layer.attention.inner_attention.bias for layer in model_config.layers} == {-math.log(512)}


# ---------------------------------------------------------------------------------------------- data


class _CharTokenizer:
    """A stand-in for torchtitan's tokenizer: one id per character, BOS 1, EOS 2."""

    def encode(self, text, add_bos=False, add_eos=False):
        return [1] * add_bos + [3 + ord(c) % 50 for c in text] + [2] * add_eos


def test_rows_positions_and_labels():
    text = "abcde\n\nfg\n\nhijklmnop"
    inputs, labels, positions = tokenize_rows(text, _CharTokenizer(), 4, documents=True)
    c = lambda ch: 3 + ord(ch) % 50
    # inputs: BOS a b c d e | BOS f g | BOS h i ... (each document without its last token, EOS), labels shifted
    # within each document; a document cut by a row boundary continues at position 0 in the next row.
    assert positions.tolist() == [[0, 1, 2, 3], [0, 1, 0, 1], [0, 0, 1, 2], [0, 1, 2, 3]]
    assert inputs[1].tolist() == [c("d"), c("e"), 1, c("f")]
    assert labels[1].tolist() == [c("e"), 2, c("f"), c("g")]
    inputs, labels, positions = tokenize_rows(text, _CharTokenizer(), 4, documents=False)
    assert (positions == torch.arange(4)).all()
    assert (labels[:, :-1] == inputs[:, 1:]).all() and labels[0, -1] == inputs[1, 0]


def test_dataset_sharding_state_and_errors(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(make_text(3, 20))
    full = LocalTextDataset(path, _CharTokenizer(), 8, documents=False, infinite=False)
    rank1 = LocalTextDataset(path, _CharTokenizer(), 8, documents=False, dp_rank=1, dp_world_size=3, infinite=False)
    assert torch.equal(rank1.inputs, full.inputs[1::3])
    it = iter(rank1)
    next(it)
    state = rank1.state_dict()
    second = next(it)
    rank1.load_state_dict(state)
    assert torch.equal(next(iter(rank1))[0]["input"], second[0]["input"])
    with pytest.raises(FileNotFoundError, match="dataset_path must be a text file"):
        LocalTextDataset(tmp_path / "missing.txt", _CharTokenizer(), 8, documents=True)
    with pytest.raises(ValueError, match="fewer than one row of seq_len=100000"):
        LocalTextDataset(path, _CharTokenizer(), 100000, documents=True)


# ---------------------------------------------------------------------------------------------- training


def _init_single_process_group(tmp_path: Path) -> None:
    if not dist.is_initialized():  # torchtitan's CheckpointManager asks for the rank
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Trains each debug flavour for a few steps with torchtitan's components; returns per flavour the losses,
    batches, checkpoint folders and model config."""
    tmp_path = tmp_path_factory.mktemp("torchtitan")
    _init_single_process_group(tmp_path)
    text = make_text(0)
    (tmp_path / "train.txt").write_text(text)
    write_tokenizer_assets(text, tmp_path / "tokenizer", 512)
    try:
        return {
            flavour: _train(tmp_path, flavour, steps)
            for flavour, steps in (("debugmodel", 5), ("debugmodel_gqa_qk_norm", 2))
        }
    finally:
        dist.destroy_process_group()  # the context-parallel test forks processes that start their own


def _train(tmp_path: Path, flavour: str, steps: int) -> dict:
    seq_len, batch = 64, 4
    config = job_config(flavour, seq_len=seq_len, local_batch_size=batch, steps=steps, lr=3e-3, warmup_steps=1)
    config.hf_assets_path = str(tmp_path / "tokenizer")
    config.dataloader.dataset_path = str(tmp_path / "train.txt")
    config.dataloader.documents = False  # GPT attends causally over the whole row
    config.checkpoint.enable, config.checkpoint.interval = True, 1
    config.checkpoint.keep_latest_k = 0
    model_config = config.model_spec.model
    model_config.update_from_config(config=config)
    torch.manual_seed(0)
    model = model_config.build()
    model.init_weights(buffer_device=None)
    model.train()
    optimizers = config.optimizer.build(model_parts=[model])
    schedulers = config.lr_scheduler.build(optimizers=optimizers, training_steps=steps)
    loss_fn = config.loss.build(compile_config=config.compile)
    loss_fn.set_lm_head(model.lm_head)  # as Trainer.__init__ does for ChunkedLossWrapper
    model._skip_lm_head = True
    tokenizer = config.tokenizer.build(tokenizer_path=config.hf_assets_path)
    dataloader = config.dataloader.build(
        dp_world_size=1, dp_rank=0, tokenizer=tokenizer, seq_len=seq_len, local_batch_size=batch
    )

    class TrainState:
        step = 0

        def state_dict(self):
            return {"step": self.step}

        def load_state_dict(self, state):
            self.step = state["step"]

    train_state = TrainState()
    dump = tmp_path / flavour
    checkpointer = config.checkpoint.build(
        dataloader=dataloader,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=schedulers,
        states={"train_state": train_state},
        sd_adapter=None,
        base_folder=str(dump),
    )
    losses, batches = [], []
    data = iter(dataloader)
    for step in range(steps):
        checkpointer.save(curr_step=step)  # the weights this step's loss is computed with
        optimizers.zero_grad()
        input_dict, labels = next(data)
        positions = input_dict["positions"]
        masks = model.get_attention_masks(positions)
        pred = model(input_dict["input"], positions=positions, attention_masks=masks)
        loss, _ = loss_fn(pred, labels, (labels != -100).sum(), positions=positions)
        loss.backward()
        dist_utils.clip_grad_norm_(list(model.parameters()), config.training.max_norm, foreach=True, pp_mesh=None)
        optimizers.step()
        schedulers.step()
        train_state.step = step + 1
        losses.append(loss.item())
        batches.append((input_dict["input"].clone(), labels.clone()))
    checkpointer.save(curr_step=steps, last_step=True)
    return {
        "losses": losses,
        "batches": batches,
        "checkpoints": [dump / "checkpoint" / f"step-{s}" for s in range(steps + 1)],
        "model_config": model_config,
        "model": model,
    }


def test_training_loss_decreases(trained):
    losses = trained["debugmodel"]["losses"]
    assert losses[-1] < losses[0] - 1.0, losses
    assert all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("flavour", ["debugmodel", "debugmodel_gqa_qk_norm"])
def test_gpt_from_each_checkpoint_computes_torchtitans_loss(trained, flavour):
    run = trained[flavour]
    for step, (loss, (inputs, labels)) in enumerate(zip(run["losses"], run["batches"], strict=True)):
        gpt = to_gpt(load_checkpoint(run["checkpoints"][step]), run["model_config"])
        assert gpt.config.block_size == 64 and gpt.config.bias_init == pytest.approx(-math.log(64))
        with torch.no_grad():
            _, gpt_loss = gpt(inputs, labels)
        assert gpt_loss.item() == pytest.approx(loss, rel=2e-6, abs=2e-6), (step, gpt_loss.item(), loss)


@pytest.mark.parametrize(
    "flavour,hf_class", [("debugmodel", "LlamaForCausalLM"), ("debugmodel_gqa_qk_norm", "Qwen3ForCausalLM")]
)
def test_transformers_model_from_the_last_checkpoint_computes_the_same_logits(trained, flavour, hf_class, tmp_path):
    pytest.importorskip("transformers")
    run = trained[flavour]
    state = load_checkpoint(run["checkpoints"][-1])
    hf = to_transformers(state, run["model_config"])
    assert type(hf).__name__ == hf_class and hf.config._attn_implementation == "sigmoid"
    assert hf.config.sigmoid_attn_bias == pytest.approx(-math.log(64))
    model = run["model"]
    inputs = run["batches"][0][0]
    model._skip_lm_head = False
    try:
        with torch.no_grad():
            want = model(inputs, positions=torch.arange(64).expand_as(inputs))
            got = hf(inputs).logits
    finally:
        model._skip_lm_head = True
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_converter_errors(trained, tmp_path):
    run = trained["debugmodel"]
    with pytest.raises(FileNotFoundError, match="holding a .metadata file"):
        load_checkpoint(tmp_path)
    unresolved = build_model_config("debugmodel")
    with pytest.raises(ValueError, match=r"call resolve_sigmoid_bias\(model_config, training_seq_len\)"):
        to_gpt(load_checkpoint(run["checkpoints"][0]), unresolved)
    with pytest.raises(ValueError, match="only sigmoid-attention checkpoints convert"):
        to_gpt({}, build_model_config("debugmodel", "flex"))


# ---------------------------------------------------------------------------------------------- context parallel

# (method, torchtitan load balancer, flavour): GQA 16/4 heads with QK-norm; Ulysses at 4 ranks repeats K/V heads.
CP_CASES = [
    ("ring", "headtail", "debugmodel_gqa_qk_norm"),
    ("ring", None, "debugmodel_gqa_qk_norm"),
    ("ulysses", "headtail", "debugmodel_gqa_qk_norm"),
]


def _cp_case_id(cp_size, method, balancer, flavour):
    return f"CP{cp_size}-{method}-{balancer or 'contiguous'}-{flavour}"


CP_WORLD = 4  # one spawn: CP over all 4 ranks, and CP of 2 inside a (dp 2, cp 2) mesh


def _cp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torchtitan.distributed.context_parallel.api import cp_shard

    meshes = {
        world_size: init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",)),
        2: init_device_mesh("cpu", (world_size // 2, 2), mesh_dim_names=("dp", "cp"))["cp"],
    }
    errors = {}
    for cp_size, mesh in meshes.items():
        for method, balancer, flavour in CP_CASES:
            case_id = _cp_case_id(cp_size, method, balancer, flavour)
            try:
                _run_cp_case(mesh, cp_shard, method, balancer, flavour, mesh.get_local_rank(), cp_size)
                errors[case_id] = None
            except Exception as error:  # recorded per case; the parent test reports it
                errors[case_id] = "".join(traceback.format_exception_only(type(error), error)).strip()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(errors, f)
    dist.destroy_process_group()


def _run_cp_case(mesh, cp_shard, method, balancer, flavour, rank, world_size):
    seq_len, batch = 32, 2
    model_config = build_model_config(flavour, bias=-math.log(seq_len))
    model_config.layers = model_config.layers[:2]  # two blocks are enough to carry gradients through attention
    for layer in model_config.layers:
        layer.attention.inner_attention.context_parallel_method = method
    torch.manual_seed(0)
    model = model_config.build()
    model.init_weights(buffer_device=None)
    tokens = torch.randint(0, model_config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(seq_len).expand(batch, seq_len).contiguous()
    probe = torch.randn(batch, seq_len, model_config.vocab_size, generator=torch.Generator().manual_seed(2))

    logits = model(tokens, positions=positions, attention_masks=model.get_attention_masks(positions))
    (logits * probe).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    load_balance = CP_LAYOUTS[balancer]
    for module in model.modules():
        if isinstance(module, SigmoidAttention):
            module.bind_context_parallel(mesh.get_group(), load_balance=load_balance)
    (local_tokens, local_positions, local_probe), _ = cp_shard(mesh, (tokens, positions, probe), None, balancer)
    # torchtitan's "headtail" shards are sigattn's zig-zag shards: the same positions on every rank.
    assert torch.equal(local_positions, shard_sequence(positions, world_size, rank, load_balance=load_balance))
    assert model.get_attention_masks(positions) is None
    local_logits = model(local_tokens, positions=local_positions, attention_masks=None)
    want_local = shard_sequence(logits.detach(), world_size, rank, load_balance=load_balance)
    torch.testing.assert_close(local_logits.detach(), want_local, rtol=1e-4, atol=1e-4)
    (local_logits * local_probe).sum().backward()
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=mesh.get_group())  # what FSDP's reduce-scatter over dp_shard x cp does
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    packed = torch.cat([torch.arange(10), torch.arange(seq_len - 10)]).expand(batch, seq_len)
    try:
        model.get_attention_masks(packed)
    except ValueError as error:
        assert "context parallel ring attention is causal over the whole sequence" in str(error)
    else:
        raise AssertionError("a packed batch under context parallel did not raise")


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory) -> dict[str, str | None]:
    """{case id: None, or the errors of the ranks where it failed}, from one spawn of CP_WORLD processes."""
    out_dir = tmp_path_factory.mktemp("titan_cp")
    # fork: the children inherit the imported torchtitan (spawning re-imports it in every process: ~20 s on 2 cores)
    mp.start_processes(
        _cp_worker, args=(CP_WORLD, str(out_dir / "store"), str(out_dir)), nprocs=CP_WORLD, start_method="fork"
    )
    per_rank = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(CP_WORLD)]
    return {
        case_id: "; ".join(f"rank {r}: {e[case_id]}" for r, e in enumerate(per_rank) if e[case_id]) or None
        for case_id in per_rank[0]
    }


@pytest.mark.parametrize("cp_size", [2, 4])
@pytest.mark.parametrize("case", CP_CASES, ids=[_cp_case_id(0, *c)[4:] for c in CP_CASES])
def test_context_parallel_model_matches_one_process(cp_results, cp_size, case):
    error = cp_results[_cp_case_id(cp_size, *case)]
    assert error is None, error
