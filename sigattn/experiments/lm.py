"""Language-model runs for the experiments: a corpus (generated, Shakespeare or the environment's Python source)
and one training run through ``sigattn.train``.

The corpus is text from a small random language (made-up words, each followed by one of a few successors),
generated from a seed, so the quick settings download nothing. A character-level model that has learnt
it needs only the last word or two, so its loss should not depend on the context length: a clean test
of evaluation at contexts longer than the training one.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..data import load_shakespeare
from ..data.pycode import DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE, load_pycode
from ..models import GPTConfig
from ..runinfo import nan_for_null, strict_json
from ..train import DataConfig, OptimConfig, RunConfig, Trainer, TrainSettings
from ..train.diagnostics import attention_stats
from ..train.metrics import read_metrics

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def synthetic_text(num_chars: int, seed: int = 0, vocabulary: int = 300, successors: int = 4) -> str:
    """About ``num_chars`` characters of sentences in a random language: ``vocabulary`` words of 1-3
    syllables; after each word comes one of its ``successors`` fixed followers, uniformly."""
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(vocabulary)})
    follow = {w: rng.sample(words, successors) for w in words}
    lines, size, word = [], 0, rng.choice(words)
    while size < num_chars:
        sentence = []
        for _ in range(rng.randint(4, 12)):
            sentence.append(word)
            word = rng.choice(follow[word])
        line = " ".join(sentence).capitalize() + "."
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


def corpus_data(kind: str, out: Path, num_chars: int) -> tuple[DataConfig, str]:
    """The data config of ``kind`` and a one-line description. "synthetic": ``num_chars`` characters generated
    into out/corpus.txt; "shakespeare": the corpus of ``sigattn.data``; "pycode": the environment's Python
    source (``sigattn.data.pycode``, built into the cache folder if it is not there), at most ``num_chars``
    bytes of it (0: all), BPE tokens."""
    if kind == "synthetic":
        path = out / "corpus.txt"
        path.write_text(synthetic_text(num_chars))
        return DataConfig(dataset="text", path=str(path), tokenizer="char"), (
            f"generated text (a random 300-word language, 4 successors per word), {num_chars:,} characters"
        )
    if kind == "shakespeare":
        load_shakespeare()  # fails early, with instructions, if the corpus cannot be had
        return DataConfig(dataset="shakespeare", tokenizer="char"), "the works of Shakespeare (sigattn.data)"
    if kind == "pycode":
        data = DataConfig(
            dataset="pycode",
            tokenizer="bpe",
            vocab_size=DEFAULT_VOCAB_SIZE,
            val_fraction=DEFAULT_VAL_FRACTION,  # the code-gpt preset's corpus: one build serves both
            max_bytes=num_chars or None,
        )
        # Built (or found) once here, so that the runs only read it.
        corpus = load_pycode(max_bytes=data.max_bytes, vocab_size=data.vocab_size, val_fraction=data.val_fraction)
        return data, f"{corpus.description}; a byte-level BPE of {DEFAULT_VOCAB_SIZE:,} ids learnt on it"
    raise ValueError(f"corpus must be 'synthetic', 'shakespeare' or 'pycode', got {kind!r}")


@dataclass(frozen=True)
class TrainRecipe:
    """The loop settings shared by an experiment's runs."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    eval_windows: int
    device: str = "auto"
    seed: int = 0
    compile: str = "auto"  # TrainSettings.compile: "off" where compiling would take longer than a short run


def run_config(
    model: GPTConfig, data: DataConfig, recipe: TrainRecipe, eval_lengths: tuple[int, ...] = ()
) -> RunConfig:
    return RunConfig(
        task="lm",
        model=model,
        data=data,
        optim=OptimConfig(lr=recipe.lr, min_lr=recipe.lr / 10, warmup_steps=recipe.warmup_steps),
        train=TrainSettings(
            max_steps=recipe.steps,
            batch_size=recipe.batch_size,
            seed=recipe.seed,
            log_every=1,
            eval_every=recipe.steps,
            eval_windows=recipe.eval_windows,
            eval_context_lengths=eval_lengths,
            device=recipe.device,
            compile=recipe.compile,
            progress=False,
            plots=False,
        ),
    )


def train_run(config: RunConfig, run_dir: Path) -> dict:
    """Trains ``config`` from scratch in ``run_dir`` and returns the attention statistics at initialisation,
    the per-step losses and gradient norms and the trainer's result. The checkpoint is deleted afterwards:
    only small files stay.

    A finished run is kept in ``run_dir/run.json`` with its configuration: an experiment started again in the
    same folder (after a time limit stopped it) takes the finished runs of the same configuration from there
    and trains only the rest. Anything else in ``run_dir`` (an unfinished run, another configuration) is
    replaced."""
    record = run_dir / "run.json"
    settings = json.loads(json.dumps(config.to_dict()))  # as read back: tuples become lists
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("config") == settings:  # strict JSON wrote a non-finite number as null: nan again
            return {k: v if k == "device" else nan_for_null(v) for k, v in saved["run"].items()}
    if run_dir.exists():
        shutil.rmtree(run_dir)
    trainer = Trainer(config, run_dir, log=lambda line: None)
    init = attention_stats(trainer.model, trainer.task.probe_input().to(trainer.device))
    result = trainer.fit()
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    rows = read_metrics(run_dir / "metrics.jsonl")
    run = {
        "init_attn_out_norm": init["attn_out_norm"],
        "train_loss": [r["train_loss"] for r in rows],
        "grad_norm": [r["grad_norm"] for r in rows],
        "grad_spikes": result.grad_spikes,
        "final_val_loss": result.final_val_loss,
        "val_loss_by_context": result.val_loss_by_context,
        "train_seconds": result.train_seconds,
        "device": result.device,
    }
    # Written last: its presence means the run finished.
    record.write_text(strict_json({"config": settings, "run": run}) + "\n")
    return run
