"""A run folder's files when they are damaged or cannot be written: `sigattn train --resume` after a power
loss tore the last line of metrics.jsonl continues; a damaged metrics line elsewhere, a truncated or corrupt
checkpoint, a checkpoint whose pickle would run code, and a run folder that cannot be written each end in
one line on stderr naming the file, and exit status 2, never a traceback; no pickle that could run code is
ever loaded. The commands run in a subprocess, as a user runs them, on micro runs of a few steps."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sigattn.train import TrainError, build_config, train
from sigattn.train.compare import seed_dir, write_comparison, write_seed_comparison
from sigattn.train.metrics import MetricsError, MetricsWriter, read_metrics

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "king", "queen", "doth", "speak", "of", "love", "and", "war", "upon", "thy", "noble", "heart", "my"]
MAX_STEPS = 8


@pytest.fixture(scope="module")
def overrides(tmp_path_factory) -> list[str]:
    """Overrides turning the tiny preset into a run of a few seconds on generated text."""
    rng = random.Random(0)
    text = tmp_path_factory.mktemp("data") / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(600)))
    settings = (
        "model.n_layer=1 model.d_model=32 model.n_head=2 model.block_size=16 train.batch_size=8 train.log_every=2 "
        "train.eval_every=4 train.eval_windows=4 train.eval_context_lengths=8,32 optim.warmup_steps=2 "
        "train.progress=false train.plots=false"
    )
    return ["data.dataset=text", f"data.path={text}", *settings.split()]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, overrides) -> Path:
    """A run stopped at step 4 of 8 (checkpoint at 4; metrics rows 2 and 4), as `sigattn train` builds it."""
    out = tmp_path_factory.mktemp("runs") / "stopped"
    train(build_config("tiny", overrides, max_steps=MAX_STEPS), out, until_step=4, log=lambda line: None)
    return out


@pytest.fixture
def run(stopped_run, tmp_path) -> Path:
    """A copy of the stopped run to damage."""
    return Path(shutil.copytree(stopped_run, tmp_path / "run"))


def sigattn_train(out: Path, overrides: list[str], *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SIGATTN_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    argv = ["train", "--preset", "tiny", "--out", str(out), "--max-steps", str(MAX_STEPS), *overrides, *extra]
    return subprocess.run(
        [sys.executable, "-m", "sigattn.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *mentions: str) -> str:
    """The command failed with status 2 and one line on stderr, no traceback, that mentions each of ``mentions``."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sigattn train: error: "), result.stderr
    for text in mentions:
        assert text in lines[0], lines[0]
    return lines[0]


class RunsCode:
    """Unpickling this runs a shell command (creating ``marker``): what a malicious checkpoint holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


# ------------------------------------------------------------------------------------------- metrics


def test_resume_drops_a_torn_last_metrics_line(run, overrides):
    """Power loss after step 6 was logged and while step 8 was being appended: the checkpoint (step 4) is the
    truth, so the row of step 6 and the torn line go, and the resumed run logs 6 and 8 again."""
    rows = read_metrics(run / "metrics.jsonl")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**rows[-1], "step": 6, "train_loss": 99.0}) + "\n" + '{"step": 8, "lo')
    result = sigattn_train(run, overrides, "--resume")
    assert result.returncode == 0, result.stderr
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6, 8] and rows[2]["train_loss"] != 99.0
    assert (run / "metrics.jsonl").read_text().endswith("}\n")


def test_resume_names_a_damaged_metrics_line(run, overrides):
    """Only the last line can be torn by an interrupted append: a damaged line before it is not guessed at."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["{garbage", *lines[1:]]) + "\n")
    result = sigattn_train(run, overrides, "--resume")
    assert_one_line_error(result, f"{run / 'metrics.jsonl'} line 1: expected a metrics row", "repair or delete")


def test_readers_drop_only_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train_loss": 1.0} for s in (2, 4, 6)]
    body = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(body.encode() + b"\0" * 512)  # a tail of zeros, as a file system may leave after power loss
    assert read_metrics(path) == rows
    assert read_metrics(path, up_to_step=4) == rows[:2]
    path.write_text(body + '{"step": 8')
    assert read_metrics(path) == rows
    path.write_text(body.replace('"step": 4', '"step": "four"'))
    with pytest.raises(
        MetricsError, match=r"metrics.jsonl line 2: expected a metrics row .*, got b'\{\"step\": \"four\""
    ):
        read_metrics(path)
    path.write_text(body + "[1, 2]\n" + body)
    with pytest.raises(MetricsError, match="line 4: "):
        read_metrics(path)


def strict_json(text: str):
    """``text`` parsed as strict JSON: a bare NaN or Infinity (Python's default for non-finite floats) fails."""

    def refuse(name):
        raise AssertionError(f"bare {name} in strict JSON: {text[:200]!r}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_metrics_round_trip_as_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    row = {"step": 2, "train_loss": math.nan, "grad_norm": math.inf, "grad_norm_max": -math.inf, "lr": 0.1}
    row |= {k: 1 for k in ("grad_spikes", "tokens", "tokens_per_s", "elapsed_s")}
    MetricsWriter(path).write({**row, "val_loss_by_context": {"8": math.nan}, "attn_out_norm": [1.0, math.inf]})
    assert strict_json(path.read_text())["train_loss"] is None
    (back,) = read_metrics(path)
    assert math.isnan(back["train_loss"]) and math.isnan(back["grad_norm"]) and math.isnan(back["grad_norm_max"])
    assert math.isnan(back["val_loss_by_context"]["8"]) and back["attn_out_norm"][0] == 1.0
    assert back["lr"] == 0.1 and back["step"] == 2
    MetricsWriter(path, resume_step=2)  # a resume rewrites the rows it keeps: strict again
    assert strict_json(path.read_text())["grad_norm"] is None


def test_a_diverged_comparison_writes_strict_json(tmp_path, overrides):
    """optim.lr=1e6 turns every loss into nan: each file is still strict JSON, and the readers see nan."""
    out = tmp_path / "cmp"
    for attn in ("sigmoid", "softmax"):
        config = build_config("tiny", [*overrides, "optim.lr=1e6"], attn=attn, max_steps=4)
        result = train(config, out / attn, log=lambda line: None)
        assert math.isnan(result.final_val_loss)
    summary = write_comparison(out, "tiny")
    assert math.isnan(summary["sigmoid"]["final_val_loss"]) and math.isnan(summary["val_loss_gap"])
    assert math.isnan(summary["softmax"]["val_loss_by_context"]["8"])
    assert all(math.isnan(r["train_loss"]) for r in read_metrics(out / "sigmoid" / "metrics.jsonl"))
    seed_dir(out, 0).mkdir()  # one seed: statistics.stdev fails on nan values, with or without strict JSON
    shutil.copy(out / "summary.json", seed_dir(out, 0) / "summary.json")
    assert math.isnan(write_seed_comparison(out, [0])["sigmoid"]["final_val_loss"]["mean"])
    for path in [*out.rglob("*.json"), *out.rglob("*.jsonl")]:
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            strict_json(line)


# ---------------------------------------------------------------------------------------- checkpoints


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage",
    [truncated, lambda path: path.write_bytes(random.Random(0).randbytes(5000)), lambda path: path.write_bytes(b"")],
    ids=["truncated", "random-bytes", "empty"],
)
def test_resume_refuses_a_damaged_checkpoint(run, overrides, damage):
    damage(run / "checkpoint.pt")
    result = sigattn_train(run, overrides, "--resume")
    assert_one_line_error(
        result,
        f"cannot resume from {run / 'checkpoint.pt'}: the file is truncated or corrupt (",
        f"Delete {run / 'checkpoint.pt'} to start over (without --resume), or restore it from a backup",
    )


def test_resume_never_unpickles_code(run, overrides, tmp_path):
    marker = tmp_path / "checkpoint-code-ran"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**state, "loop": RunsCode(marker)}, run / "checkpoint.pt")
    result = sigattn_train(run, overrides, "--resume")
    line = assert_one_line_error(result, f"cannot resume from {run / 'checkpoint.pt'}: it holds an object other than")
    assert "system), which could run code when loaded; it was not loaded" in line
    assert not marker.exists()


@pytest.mark.parametrize("file", [".metadata", "loop.pt"])
def test_resume_never_unpickles_code_in_a_sharded_checkpoint(tmp_path, overrides, file):
    """train.parallel=ddp in one process writes DCP's checkpoint/ folder; DCP itself would unpickle its
    .metadata with plain pickle, running whatever it names."""
    config = build_config("tiny", [*overrides, "train.parallel=ddp"], max_steps=MAX_STEPS)
    out = tmp_path / "run"
    train(config, out, until_step=2, log=lambda line: None)
    marker = tmp_path / "checkpoint-code-ran"
    if file == "loop.pt":
        torch.save(RunsCode(marker), out / "checkpoint" / file)
    else:
        (out / "checkpoint" / file).write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(TrainError) as error:
        train(config, out, resume=True, log=lambda line: None)
    assert not marker.exists()
    assert str(error.value).startswith(f"cannot resume from {out / 'checkpoint' / file}: it ")
    assert "could run code when loaded; it was not loaded" in str(error.value)
    assert f"Delete {out / 'checkpoint'} to start over" in str(error.value)


# ------------------------------------------------------------------------------------------ run folder


def test_a_run_folder_that_cannot_be_created_is_one_line(tmp_path, overrides):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    result = sigattn_train(blocker / "run", overrides)
    assert_one_line_error(
        result, f"cannot write to the run folder {blocker / 'run'} (Not a directory: ", "or choose another --out"
    )


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no file can be created in: mode 555, or for root (whom modes do not stop) the immutable
    attribute, where the file system has one."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", folder], capture_output=True).returncode:
        pytest.skip("running as root on a file system without the immutable attribute")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", folder], check=True)


def test_a_read_only_run_folder_is_one_line(read_only_folder, overrides):
    result = sigattn_train(read_only_folder, overrides)
    assert_one_line_error(
        result, f"cannot write to the run folder {read_only_folder} (", "): make it writable or choose another --out"
    )
