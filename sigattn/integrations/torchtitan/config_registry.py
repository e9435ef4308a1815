"""torchtitan job configs ("config registry") for sigmoid attention, runnable with torchtitan's launcher:

    torchrun --nproc-per-node 1 -m torchtitan.train \\
        --module sigattn.integrations.torchtitan --config sigmoid_llama3_debugmodel \\
        --hf_assets_path ./assets/tokenizer --dataloader.dataset_path ./data/train.txt

torchtitan 0.3 replaced its TOML job files with these Python functions (``--module`` imports
``<module>.config_registry``, ``--config`` names the function); every field can be overridden on the
command line as ``--section.field value``. Each sigmoid job has a softmax twin of the same architecture
(torchtitan's FlexAttention), for comparisons on the same data.

The data is a local text file (``LocalTextDataLoader``) and the tokenizer a folder written by
``write_tokenizer_assets`` (or ``python -m sigattn.integrations.torchtitan tokenizer TEXT OUT``): nothing is
downloaded. Validation is off (torchtitan's validator reads Hugging Face datasets).
"""

from __future__ import annotations

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.components.validate import Validator
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed.activation_checkpoint import SelectiveAC
from torchtitan.trainer import Trainer

from .data import LocalTextDataLoader
from .model import model_registry

__all__ = [
    "job_config",
    "sigmoid_llama3_100m",
    "sigmoid_llama3_debugmodel",
    "softmax_llama3_100m",
    "softmax_llama3_debugmodel",
]


def job_config(
    flavour: str,
    attn_backend: str = "sigmoid",
    *,
    seq_len: int,
    local_batch_size: int,
    steps: int,
    lr: float,
    warmup_steps: int,
) -> Trainer.Config:
    """A torchtitan ``Trainer.Config`` for a registered flavour (``model.FLAVOURS``) on a local text file."""
    model_spec = model_registry(flavour, attn_backend)
    return Trainer.Config(
        model_spec=model_spec,
        hf_assets_path="./assets/tokenizer",
        dump_folder="./outputs",
        loss=ChunkedLossWrapper.Config(
            loss_fn=CrossEntropyLoss.Config(global_vocab_size=model_spec.model.vocab_size),
        ),
        optimizer=default_adamw(lr=lr),
        lr_scheduler=LRSchedulersContainer.Config(
            warmup_steps=warmup_steps, decay_ratio=0.8, decay_type="cosine", min_lr_factor=0.1
        ),
        training=TrainingConfig(local_batch_size=local_batch_size, seq_len=seq_len, steps=steps),
        dataloader=LocalTextDataLoader.Config(dataset_path="./data/train.txt"),
        metrics=MetricsProcessor.Config(log_freq=10),
        parallelism=ParallelismConfig(),
        checkpoint=CheckpointManager.Config(interval=max(steps // 4, 1), last_save_model_only=True),
        activation_checkpoint=SelectiveAC.Config(),
        compile=CompileConfig(),
        validator=Validator.Config(enable=False),
    )


def sigmoid_llama3_debugmodel() -> Trainer.Config:
    """torchtitan's Llama 3 debug model with sigmoid attention: 20 steps of 8 x 256 tokens."""
    return job_config("debugmodel", "sigmoid", seq_len=256, local_batch_size=8, steps=20, lr=8e-4, warmup_steps=2)


def softmax_llama3_debugmodel() -> Trainer.Config:
    """The same job with torchtitan's softmax FlexAttention."""
    return job_config("debugmodel", "flex", seq_len=256, local_batch_size=8, steps=20, lr=8e-4, warmup_steps=2)


def sigmoid_llama3_100m() -> Trainer.Config:
    """The ~100M sigmoid-attention recipe (b = -log 2048, QK-norm, GQA): 2000 steps of 16 x 2048 tokens."""
    return job_config("100M", "sigmoid", seq_len=2048, local_batch_size=16, steps=2000, lr=1e-3, warmup_steps=200)


def softmax_llama3_100m() -> Trainer.Config:
    """The same job with torchtitan's softmax FlexAttention."""
    return job_config("100M", "flex", seq_len=2048, local_batch_size=16, steps=2000, lr=1e-3, warmup_steps=200)
