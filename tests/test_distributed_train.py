"""Data-parallel training (``train.parallel``, sigattn/train/parallel.py) on the CPU with gloo, across 2 and
4 processes, against one-process runs of the same config (a 1-layer GPT on generated text, 8 steps,
float32).

* DDP, FSDP2 and FSDP2 with activation checkpointing give, at every step, the loss of the one-process step
  on the same global batch, and the same parameters after the last step.
* A run checkpointed (DCP) at step 5 on 1 process and resumed on N, and one checkpointed on N and resumed
  on 1, reach the losses and parameters of an uninterrupted run.

The ranks sum their gradients in another order than one process does, so "the same" is float32 rounding:
``TOL`` below. Spawning is slow, so one group per world size runs every job; the checks are separate tests.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from sigattn.train import Trainer, TrainError, build_config, train
from sigattn.train.metrics import read_metrics
from sigattn.train.parallel import Parallel, ParallelError, local_rows

STEPS, EVAL_EVERY = 8, 4
# The resumed runs stop at step 5 and log every 3 steps: step 5's loss is pending in the checkpoint (saved as
# the mean over the ranks) and enters step 6's logged average after the resume.
SPLIT, RESUME_LOG = 5, "train.log_every=3"
MODES = ["ddp", "fsdp"]
WORLD_SIZES = [2, 4]
# float32, 8 AdamW steps at lr ~3e-3. Measured (torch 2.13, CPU): losses (~3.4) differ by at most 4.8e-7
# (2 ulp), parameters by at most 3.7e-9. DDP's gradient all-reduce left out: 6e-2. (A rank training on the
# whole batch would match too: how.json checks the rows.)
TOL = {"rtol": 1e-6, "atol": 1e-6}
WORDS = ["the", "king", "queen", "doth", "speak", "of", "love", "and", "war", "upon", "thy", "noble", "heart", "my"]
# job -> (mode, extra overrides); every job trains STEPS steps from scratch on the N processes.
FULL_RUNS = {
    "ddp": ("ddp", []),
    "fsdp": ("fsdp", []),
    "fsdp-ac": ("fsdp", ["train.activation_checkpointing=true"]),
}


def micro(text_file, mode: str = "none", *extra: str) -> list[str]:
    """Overrides turning the tiny preset into an 8-step run on generated text, one log line per step."""
    settings = (
        f"train.parallel={mode} model.n_layer=1 model.d_model=32 model.n_head=2 model.block_size=16 "
        f"train.batch_size=8 train.max_steps={STEPS} train.log_every=1 train.eval_every={EVAL_EVERY} "
        "train.eval_windows=4 train.eval_context_lengths=32 optim.warmup_steps=2 train.progress=false "
        "train.plots=false train.device=cpu train.compile=off"
    )
    return ["data.dataset=text", f"data.path={text_file}", *settings.split(), *extra]


def quiet(line: str) -> None:
    pass


def full_params(trainer: Trainer) -> dict:
    """The whole (unsharded) model on the CPU; a collective under FSDP."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(trainer.model, options=options)


def run_to_end(config, out, *, resume: bool = False, until_step: int | None = None) -> None:
    """Trains (every rank), then rank 0 (or the one process) saves the final parameters as params.pt."""
    trainer = Trainer(config, out, resume=resume, log=quiet)
    trainer.fit(until_step)
    params = full_params(trainer)
    weight = next(trainer.model.blocks[0].parameters())
    if trainer.parallel.is_main:
        torch.save(params, out / "params.pt")
        how = {
            "rows": [trainer.rows.start, trainer.rows.stop],
            "wrapper": type(trainer.forward).__name__,
            "sharded": type(weight).__name__ == "DTensor",
        }
        (out / "how.json").write_text(json.dumps(how))


# ------------------------------------------------------------------------------------ the spawned group


def _worker(rank: int, world_size: int, text_file: str, root: str) -> None:
    torch.set_num_threads(1)  # 2 cores for up to 4 processes
    root = Path(root)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{root / 'store'}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    jobs = {}
    for name, (mode, extra) in FULL_RUNS.items():
        jobs[name] = lambda m=mode, e=extra, n=name: run_to_end(build_config("tiny", micro(text_file, m, *e)), root / n)
    for mode in MODES:
        config = build_config("tiny", micro(text_file, mode, RESUME_LOG))
        # Resume the 1-process run the parent checkpointed at step SPLIT (copied to root / "resumed-MODE").
        jobs[f"resume-{mode}"] = lambda c=config, m=mode: run_to_end(c, root / f"resumed-{m}", resume=True)
        # Stop at step SPLIT; the parent resumes it on 1 process.
        jobs[f"split-{mode}"] = lambda c=config, m=mode: run_to_end(c, root / f"split-{m}", until_step=SPLIT)
    errors = {}
    for name, job in jobs.items():
        try:
            job()
            errors[name] = None
        except Exception as error:  # recorded per job; the parent test reports it
            errors[name] = "".join(traceback.format_exception_only(type(error), error)).strip()
        dist.barrier()
    (root / f"rank{rank}.json").write_text(json.dumps(errors))
    # Leave without tearing gloo down: its teardown aborted a rank now and then ("terminate called without
    # an active exception", 2 of 7 fresh-clone CI runs), after every job had finished and the rank's results
    # were on disk, and the parent then failed the test on the exit signal.
    os._exit(0)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "." for _ in range(600)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_file):
    """One process: uninterrupted runs (no parallel) logging every step ("whole") and every 3 ("whole-log3"),
    and runs in each mode (logging every 3) stopped at step SPLIT."""
    root = tmp_path_factory.mktemp("one")
    run_to_end(build_config("tiny", micro(text_file)), root / "whole")
    run_to_end(build_config("tiny", micro(text_file, "none", RESUME_LOG)), root / "whole-log3")
    for mode in MODES:
        config = build_config("tiny", micro(text_file, mode, RESUME_LOG))
        run_to_end(config, root / f"split-{mode}", until_step=SPLIT)
    return root


@pytest.fixture(scope="module")
def groups(tmp_path_factory, text_file, reference):
    """world_size -> (its folder, {job: None or the ranks' errors}); one spawn per world size."""
    cache = {}

    def get(world_size: int):
        if world_size not in cache:
            root = tmp_path_factory.mktemp(f"gloo{world_size}")
            for mode in MODES:
                shutil.copytree(reference / f"split-{mode}", root / f"resumed-{mode}")
            mp.spawn(_worker, args=(world_size, str(text_file), str(root)), nprocs=world_size)
            per_rank = [json.loads((root / f"rank{r}.json").read_text()) for r in range(world_size)]
            errors = {
                job: "; ".join(f"rank {r}: {e[job]}" for r, e in enumerate(per_rank) if e[job]) or None
                for job in per_rank[0]
            }
            cache[world_size] = root, errors
        return cache[world_size]

    return get


def assert_same_run(run, whole) -> None:
    """The same logged losses, the same validation losses and the same final parameters."""
    rows, expected = read_metrics(run / "metrics.jsonl"), read_metrics(whole / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    torch.testing.assert_close(
        torch.tensor([r["train_loss"] for r in rows]), torch.tensor([r["train_loss"] for r in expected]), **TOL
    )
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    val_expected = [(r["step"], r["val_loss"]) for r in expected if "val_loss" in r]
    assert [s for s, _ in val] == [s for s, _ in val_expected] == [EVAL_EVERY, STEPS]
    torch.testing.assert_close(torch.tensor([v for _, v in val]), torch.tensor([v for _, v in val_expected]), **TOL)
    params, expected_params = torch.load(run / "params.pt"), torch.load(whole / "params.pt")
    assert params.keys() == expected_params.keys()
    for name, value in params.items():
        torch.testing.assert_close(value, expected_params[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=[f"N{n}" for n in WORLD_SIZES])
@pytest.mark.parametrize("job", list(FULL_RUNS))
def test_parallel_steps_equal_the_one_process_steps(groups, reference, world_size, job):
    root, errors = groups(world_size)
    assert errors[job] is None, errors[job]
    assert_same_run(root / job, reference / "whole")
    assert [r["step"] for r in read_metrics(root / job / "metrics.jsonl")] == list(range(1, STEPS + 1))
    how = json.loads((root / job / "how.json").read_text())  # what rank 0 ran: its rows, the wrapping
    assert how["rows"] == [0, 8 // world_size]
    assert (how["wrapper"], how["sharded"]) == (
        ("DistributedDataParallel", False) if job == "ddp" else ("FSDPGPT", True)
    )
    result = json.loads((root / job / "result.json").read_text())
    assert result["device"].startswith(f"{world_size} x cpu") and result["steps"] == STEPS
    assert not (root / job / "checkpoint.pt").exists() and (root / job / "checkpoint" / "loop.pt").exists()


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=[f"N{n}" for n in WORLD_SIZES])
@pytest.mark.parametrize("mode", MODES)
def test_a_one_process_checkpoint_resumes_on_n(groups, reference, world_size, mode):
    root, errors = groups(world_size)
    assert errors[f"resume-{mode}"] is None, errors[f"resume-{mode}"]
    assert_same_run(root / f"resumed-{mode}", reference / "whole-log3")
    assert json.loads((root / f"resumed-{mode}" / "result.json").read_text())["device"].startswith("cpu")  # 1, then N


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=[f"N{n}" for n in WORLD_SIZES])
@pytest.mark.parametrize("mode", MODES)
def test_an_n_process_checkpoint_resumes_on_one(groups, reference, text_file, world_size, mode):
    root, errors = groups(world_size)
    assert errors[f"split-{mode}"] is None, errors[f"split-{mode}"]
    assert [r["step"] for r in read_metrics(root / f"split-{mode}" / "metrics.jsonl")] == [3, 4]  # 5 pending
    run_to_end(build_config("tiny", micro(text_file, mode, RESUME_LOG)), root / f"split-{mode}", resume=True)
    assert_same_run(root / f"split-{mode}", reference / "whole-log3")


# --------------------------------------------------------------------------------------------- in-process


def test_each_rank_takes_its_rows_of_the_global_batch():
    assert [local_rows(8, Parallel("ddp", rank=r, world_size=4)) for r in range(4)] == [
        slice(0, 2),
        slice(2, 4),
        slice(4, 6),
        slice(6, 8),
    ]
    shares = r"train.batch_size \(6\) is the global batch and must be a multiple of the number of processes \(4\)"
    with pytest.raises(ParallelError, match=shares):
        local_rows(6, Parallel("fsdp", rank=1, world_size=4))


def test_torchrun_without_a_parallel_mode_is_an_error(tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainError, match="WORLD_SIZE=2 but train.parallel is 'none': choose train.parallel=ddp"):
        train(build_config("tiny", micro(text_file)), tmp_path, log=quiet)


def test_resume_needs_the_checkpoint_of_its_mode(tmp_path, text_file):
    train(build_config("tiny", micro(text_file, "none", "train.max_steps=1")), tmp_path / "plain", log=quiet)
    with pytest.raises(TrainError, match=r"--resume: no checkpoint/ \(train.parallel=ddp\) in"):
        train(build_config("tiny", micro(text_file, "ddp", "train.max_steps=1")), tmp_path / "plain", resume=True)
    train(build_config("tiny", micro(text_file, "ddp", "train.max_steps=1")), tmp_path / "dcp", log=quiet)
    with pytest.raises(TrainError, match=r"already holds a run \(checkpoint.pt or checkpoint/\)"):
        train(build_config("tiny", micro(text_file, "ddp", "train.max_steps=1")), tmp_path / "dcp", log=quiet)
