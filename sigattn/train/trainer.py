"""The training loop: AdamW with warmup + cosine, gradient clipping, bf16 autocast on CUDA, optional
activation checkpointing and ``torch.compile``, periodic evaluation and diagnostics, atomic checkpoints
and exact resumption.

A run writes into its output folder:

    config.json      the settings (``RunConfig.to_dict()``)
    data.json        what the corpus held, for data.dataset=pycode (its manifest: ``sigattn.data.pycode``)
    metrics.jsonl    one JSON object per logged step (``sigattn.train.metrics``)
    checkpoint.pt    model, optimizer, step, random-number state and loop state (written atomically)
    result.json      final validation loss, tokens/s and totals; ``stopped_by`` names the signal that stopped it
    loss.png, diagnostics.png
    tensorboard/     with ``train.log_to=tensorboard`` (``sigattn.train.loggers``)

Resuming (``resume=True``) continues from checkpoint.pt to the same losses an uninterrupted run reaches
(bit for bit on the CPU, at the same number of threads): batches are a function of (seed, step), the
random-number state, optimizer state and the pending loss average are restored, and metrics.jsonl is cut
back to the checkpoint's step (the checkpoint is the truth: rows logged after it, and a last line torn by
the interruption, are dropped). The configuration given on resume must be the saved one (config.json)
except for ``RESUMABLE_CHANGES`` (progress, logging, evaluation and checkpoint intervals, threads) and
``max_steps`` (``resumed_config``): a larger ``max_steps`` extends the run, a finished one too; the
learning-rate schedule stays the one the run started with (``train.decay_steps`` is pinned to the original
``max_steps``), so the added steps train at ``optim.min_lr``. A checkpoint that is truncated, corrupt or
holds objects other than plain data is refused with a TrainError that names it
(``checkpoint.load_checkpoint``), as is a run folder that cannot be written.

Ctrl-C (SIGINT) or SIGTERM stops after the current step and writes a checkpoint (``RunResult.stopped_by``
names the signal); a second one stops at once (``Interrupted``). A run that fails before its first step
removes the folder it created.

With ``train.parallel`` = ddp or fsdp the run is data-parallel under torchrun (``parallel.py``): each rank
trains on its share of the global batch, rank 0 alone logs and writes the run's files, and the model and
optimizer are checkpointed with DCP in ``checkpoint/`` instead of checkpoint.pt, resumable on any number of
processes. Under torchrun a stop request takes effect at the next logged step (the ranks agree on it there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import CorpusUnavailableError
from ..runinfo import cpu_name, strict_json
from . import parallel as par
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_atomic, set_rng_state
from .config import RESUMABLE_CHANGES, ConfigError, RunConfig
from .diagnostics import SpikeDetector, attention_stats
from .loggers import MetricsLoggers, check_available
from .metrics import MetricsWriter, read_metrics
from .progress import Progress
from .schedule import learning_rate
from .tasks import make_task

Log = Callable[[str], None]
CHECKPOINT = "checkpoint.pt"
COMPARE_FILE = "compare.json"  # what marks a comparison's folder (``sigattn.train.compare``)
CHECKPOINT_FORMAT = 1
STATE_KEYS = ("config", "step", "rng", "task", "loop")  # besides "format"; checkpoint.pt adds the next two
MODEL_KEYS = ("model", "optimizer")
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


class TrainError(RuntimeError):
    """A run that cannot start or continue as asked (no checkpoint to resume, a changed config, ...)."""


@dataclass
class RunResult:
    """What a finished (or stopped) run reports; also written to ``result.json``."""

    out_dir: str
    attn: str
    steps: int
    max_steps: int
    final_val_loss: float | None
    val_loss_by_context: dict | None
    tokens_per_s: float | None
    train_seconds: float
    tokens: int
    grad_spikes: int
    stopped_early: bool  # before max_steps: by a signal, or at ``until_step``
    device: str  # where the steps ran, e.g. "NVIDIA H100 80GB HBM3" ("A + B" if a resume moved the run)
    stopped_by: str | None = None  # the signal that stopped the run ("SIGINT", "SIGTERM"), if one did
    params: int | None = None  # the model's parameters (tied embeddings once)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def device_name(device: torch.device) -> str:
    """A readable name: the GPU's, or the CPU's with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device is 'cuda' but CUDA is not available; use train.device=cpu or auto")
    return torch.device(name)


def compile_mode(setting: str, device: torch.device, parallel: str) -> str | None:
    """How ``train.compile`` = ``setting`` compiles the training step on ``device`` under ``train.parallel``:
    None (eager), "default" (``torch.compile``) or "reduce-overhead" (``torch.compile`` replaying CUDA
    graphs, which needs one CUDA device). auto: CUDA graphs on one CUDA device, "default" on CUDA under data
    parallelism, eager on the CPU."""
    one_gpu = device.type == "cuda" and parallel == "none"
    if setting == "cudagraphs" and not one_gpu:
        raise TrainError(
            f"compile='cudagraphs' needs a CUDA device and parallel='none', got device {device.type!r} and "
            f"parallel={parallel!r}: use compile='on' instead"
        )
    if setting == "cudagraphs" or (setting == "auto" and one_gpu):
        return "reduce-overhead"
    if setting == "on" or (setting == "auto" and device.type == "cuda"):
        return "default"
    return None


def join_ranks(mode: str, batch_size: int, device: torch.device) -> tuple[par.Parallel, slice]:
    """This process's place in ``train.parallel`` = ``mode`` and its rows of the global batch; a setup that
    cannot run is a TrainError (and leaves no process group it created behind)."""
    parallel = None
    try:
        parallel = par.setup(mode, device)
        return parallel, par.local_rows(batch_size, parallel)
    except par.ParallelError as error:
        if parallel is not None:
            parallel.close()
        raise TrainError(str(error)) from None


def prepare_run_folder(out: Path) -> Path | None:
    """Creates ``out`` and writes (and deletes) a file there, so that a folder the run cannot write is a
    TrainError now, before the data and model are built, rather than an OSError at its first file.

    Returns the topmost folder it created (``out`` or a missing parent), None if ``out`` existed."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"the run folder {out} is a file, not a folder: choose another --out (or move the file)")
    created = next((folder for folder in reversed([out, *out.parents]) if not folder.exists()), None)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        if created is not None and created.is_dir():
            shutil.rmtree(created, ignore_errors=True)
        raise TrainError(
            f"cannot write to the run folder {out} ({error.strerror or error}: {error.filename or out}): make it "
            "writable or choose another --out"
        ) from None
    return created


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings (dim >= 2); none on norms, biases and LayerScale."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """The settings that differ between two config dicts, as ``name: saved -> current``."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def resumed_config(saved: dict, requested: RunConfig, step: int, out: Path) -> RunConfig:
    """The configuration a run saved with ``saved`` (its config dict) continues under at ``step`` when resumed
    with ``requested``: ``requested`` itself, if it differs from ``saved`` only in ``RESUMABLE_CHANGES`` and
    ``train.max_steps``. A changed ``max_steps`` pins ``train.decay_steps`` to the schedule the run started
    with, so the steps already taken keep their learning rates and the steps past it train at min_lr.

    Raises TrainError for a ``max_steps`` below ``step``, and listing every other difference."""
    if requested.train.max_steps < step:
        raise TrainError(
            f"train.max_steps={requested.train.max_steps} is below the step the run in {out} has reached ({step}): "
            f"give --max-steps {step} or more"
        )
    saved_train = saved.get("train", {})
    horizon = saved_train.get("decay_steps") or saved_train.get("max_steps")
    train = requested.train
    if train.decay_steps is None and train.max_steps != horizon:
        requested = dataclasses.replace(requested, train=dataclasses.replace(train, decay_steps=horizon))
    ignored = RESUMABLE_CHANGES | {"train.max_steps", "train.decay_steps"}
    diffs = [diff for diff in config_diff(saved, requested.to_dict()) if diff.split(":")[0] not in ignored]
    if requested.train.schedule_steps != horizon:
        diffs.append(
            f"train.decay_steps (where the schedule reaches min_lr): {horizon} -> {requested.train.schedule_steps}"
        )
    if diffs:
        raise TrainError(
            f"--resume continues the run saved in {out} with its own settings; these differ: " + "; ".join(diffs)
        )
    return requested


class Interrupted(KeyboardInterrupt):
    """A second SIGINT or SIGTERM during a run: it stopped at once, without a new checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_dir: Path | None = None  # the run it stopped, where one of several was (``compare`` sets it)


class StopRequest:
    """Turns the first SIGINT (Ctrl-C) or SIGTERM into a request to stop after the current step (``signum``
    records which); a second one raises ``Interrupted`` at once. Only in the main thread (where Python
    delivers signals). One request can span several runs (``compare``)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        """The signal's name ("SIGINT" or "SIGTERM") once requested, else None."""
        return signal.Signals(self.signum).name if self.signum is not None else None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise Interrupted(signum)
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Trainer:
    """One run of ``config`` in ``out_dir``; ``resume=True`` continues the run saved there.

    ``log`` receives one line per evaluation, stop and (when stderr is not a terminal) logged step (default:
    stderr). With ``resume`` the configuration is ``resumed_config``'s (``self.config``)."""

    def __init__(self, config: RunConfig, out_dir: str | Path, *, resume: bool = False, log: Log | None = None):
        self.config, self.out = config, Path(out_dir)
        self.log = log or (lambda line: print(line, file=sys.stderr))
        state = self._load_state() if resume else None
        if not resume:
            self._refuse_existing_run()
        missing = check_available(self.config.train.log_to)
        if missing:
            raise TrainError(missing)
        created = prepare_run_folder(self.out)
        try:
            self._setup(state)
        except BaseException:
            if created is not None:  # a run that fails at its start leaves no folder behind
                shutil.rmtree(created, ignore_errors=True)
            raise

    def _refuse_existing_run(self) -> None:
        if (self.out / CHECKPOINT).exists() or par.checkpoint_exists(self.out):
            raise TrainError(
                f"{self.out} already holds a run ({CHECKPOINT} or {par.CHECKPOINT_DIR}/): pass --resume to continue "
                "it, or choose another --out"
            )
        if (self.out / COMPARE_FILE).exists():  # a run there would overwrite the comparison's plots
            raise TrainError(
                f"{self.out} holds a comparison ({COMPARE_FILE}; its runs are in {self.out / 'sigmoid'} and "
                f"{self.out / 'softmax'}): choose another --out"
            )

    def _setup(self, state: dict | None) -> None:
        """Everything after the run folder exists: the steps in the order they must run."""
        settings = self.config.train
        device = resolve_device(settings.device)
        self.compile_mode = compile_mode(settings.compile, device, settings.parallel)
        # self.rows: this rank's share of the batch
        self.parallel, self.rows = join_ranks(settings.parallel, settings.batch_size, device)
        self.device = par.rank_device(device, self.parallel)
        self.use_bf16 = settings.precision == "bf16" or (settings.precision == "auto" and self.device.type == "cuda")
        self._build(state)
        self._reset_loop()
        if state is not None:
            self._restore(state)
        self._open_run_files(resumed=state is not None)

    @property
    def cuda_graphs(self) -> bool:
        """Whether each step replays CUDA graphs (``torch.compile(mode="reduce-overhead")``)."""
        return self.compile_mode == "reduce-overhead"

    def _build(self, state: dict | None) -> None:
        """The task (data), the model on this rank's device, its optimizer and the step's forward."""
        config, settings = self.config, self.config.train
        torch.manual_seed(settings.seed)  # the same initial model on every rank
        try:
            self.task = make_task(config, state["task"] if state else None)
        except (CorpusUnavailableError, ValueError, ImportError) as error:
            raise TrainError(f"data: {error}") from None
        self.model = self.task.build_model().to(self.device)
        self.model.activation_checkpointing = settings.activation_checkpointing
        if self.parallel.rank > 0:
            torch.manual_seed(settings.seed + self.parallel.rank)  # dropout masks differ between the ranks
        # DDP's wrapper; FSDP2 shards self.model in place (before the optimizer sees its parameters).
        wrapped = par.wrap(self.model, self.parallel, self.device, self.use_bf16)
        fused = self.device.type == "cuda"
        opt = config.optim
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, opt.weight_decay), lr=opt.lr, betas=(opt.beta1, opt.beta2), fused=fused
        )
        self.forward = wrapped if self.compile_mode is None else torch.compile(wrapped, mode=self.compile_mode)

    def _reset_loop(self) -> None:
        """The loop's state at step 0 (``_restore`` then sets a resumed run's)."""
        self.spikes = SpikeDetector(self.config.train.spike_factor)
        self.step = 0
        self.pending_losses: list = []  # since the last logged step: losses, gradient norms
        self.pending_norms: list = []
        self.tokens = 0
        self.train_seconds = 0.0  # training steps only (no evaluation), over the whole run
        self.timed_tokens, self.timed_seconds = 0, 0.0  # the same, less each process's first interval
        self.last_eval: dict = {}
        self.devices: list[str] = []  # where the steps ran

    def _open_run_files(self, resumed: bool) -> None:
        """config.json, tokenizer.json, data.json and metrics.jsonl on rank 0; the other ranks log nothing."""
        self.metrics = None  # rank 0 only
        if not self.parallel.is_main:
            self.log = _silent
            return
        config = self.config
        (self.out / "config.json").write_text(strict_json(config.to_dict(), indent=2) + "\n")
        if config.task == "lm":
            (self.out / "tokenizer.json").write_text(strict_json(self.task.state()["tokenizer"]) + "\n")
            if self.task.manifest is not None:
                (self.out / "data.json").write_text(strict_json(self.task.manifest, indent=2) + "\n")
        self.metrics = MetricsWriter(self.out / "metrics.jsonl", resume_step=self.step if resumed else None)

    # ------------------------------------------------------------------------------- state

    def _load_state(self) -> dict:
        """The saved state less the model and optimizer (which DCP loads after wrapping, ``_restore``)."""
        path = self.out / CHECKPOINT
        sharded = self.config.train.parallel != "none"
        try:
            if sharded and par.checkpoint_exists(self.out):
                state = par.load_loop_state(self.out)
                path = self.out / par.CHECKPOINT_DIR
            elif not sharded and path.exists():
                state = load_checkpoint(path)
            else:
                name = f"{par.CHECKPOINT_DIR}/ (train.parallel={self.config.train.parallel})" if sharded else CHECKPOINT
                raise TrainError(f"--resume: no {name} in {self.out} to resume from")
        except CheckpointError as error:
            # A sharded checkpoint is its folder (loop.pt and the shards): deleting loop.pt alone would orphan them.
            raise _cannot_resume(str(error), error.path.parent if sharded else error.path) from None
        _check_state(state, path, STATE_KEYS if sharded else STATE_KEYS + MODEL_KEYS)
        self.config = resumed_config(state["config"], self.config, state["step"], self.out)
        return state

    def _restore(self, state: dict) -> None:
        if self.config.train.parallel == "none":
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            try:
                par.load_checkpoint(self.out, self.model, self.optimizer, self.parallel)
            except CheckpointError as error:
                raise _cannot_resume(str(error), error.path if error.path.is_dir() else error.path.parent) from None
        loop = state["loop"]
        self.step = state["step"]
        self.spikes.load_state_dict(loop["spikes"])
        self.pending_losses = [torch.tensor(v) for v in loop["pending_losses"]]
        self.pending_norms = [torch.tensor(v) for v in loop["pending_norms"]]
        self.tokens, self.train_seconds = loop["tokens"], loop["train_seconds"]
        self.timed_tokens, self.timed_seconds = loop["timed_tokens"], loop["timed_seconds"]
        self.last_eval = loop["last_eval"]
        self.devices = list(loop["devices"])
        rng = state["rng"]  # parallel runs: one per rank
        if isinstance(rng, dict):
            set_rng_state(rng)
        elif self.parallel.rank < len(rng):
            # Exact on the same number of processes; a rank the saved run did not have keeps its seed.
            set_rng_state(rng[self.parallel.rank])

    def save(self) -> None:
        """Writes checkpoint.pt (or, with train.parallel, checkpoint/ through DCP) atomically."""
        pending = self.pending_losses
        if pending:  # the ranks' means: what the next logged average needs on any number of processes
            pending = par.mean_over_ranks(torch.stack(pending).float(), self.parallel).tolist()
        loop = {
            "spikes": self.spikes.state_dict(),
            "pending_losses": [float(v) for v in pending],
            "pending_norms": [float(v) for v in self.pending_norms],
            "tokens": self.tokens,
            "train_seconds": self.train_seconds,
            "timed_tokens": self.timed_tokens,
            "timed_seconds": self.timed_seconds,
            "last_eval": self.last_eval,
            "devices": self.devices,
        }
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "step": self.step,
            "rng": rng_state(),
            "task": self.task.state(),
            "loop": loop,
        }
        if self.config.train.parallel != "none":
            state["rng"] = par.gather_objects(state["rng"], self.parallel)
            par.save_checkpoint(self.out, self.model, self.optimizer, state, self.parallel)
            return
        state.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
        save_atomic(state, self.out / CHECKPOINT)

    # -------------------------------------------------------------------------------- loop

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when the run uses it, else a no-op context."""
        if self.use_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sdpa_context(self):
        name = self.config.train.sdpa_backend
        if name == "auto" or self.config.model.attn != "softmax":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name]))

    def train_step(self) -> None:
        """One optimizer step on the batch of ``self.step``."""
        x, y = (t[self.rows].to(self.device, non_blocking=True) for t in self.task.train_batch(self.step))
        lr = learning_rate(self.step, self.config.optim, self.config.train.schedule_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast(), self._sdpa_context():
            _, loss = self.forward(x, y)
        loss.backward()
        clip = self.config.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor (already reduced over the ranks)
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The next CUDA-graph replay writes its loss where this one is: keep a copy.
        self.pending_losses.append(loss.detach().clone() if self.cuda_graphs else loss.detach())
        self.pending_norms.append(norm.detach())
        self.tokens += self.task.tokens_per_batch
        self.step += 1

    def fit(self, until_step: int | None = None, *, stop: StopRequest | None = None) -> RunResult:
        """Trains to ``train.max_steps`` (or stops at ``until_step``), then checkpoints and reports.

        A SIGINT or SIGTERM stops after the current step (``stop``: a request shared with the caller, which
        then also sees it; by default one for this call)."""
        settings = self.config.train
        with contextlib.ExitStack() as stack:
            stop = stack.enter_context(StopRequest()) if stop is None else stop
            if settings.threads:
                stack.enter_context(_cpu_threads(settings.threads))
            loggers = stack.enter_context(self._metrics_loggers())
            progress = Progress(
                self.config.model.attn,
                settings.max_steps,
                self.step,
                settings.progress and self.parallel.is_main,
                self.log,
            )
            stack.callback(progress.close)
            stopped = self._loop(until_step, stop, progress, loggers)
            if stopped:
                progress.write(
                    f"[{self.config.model.attn}] stopped at step {self.step} of {settings.max_steps} by {stop.name}: "
                    f"checkpoint written to {self.out / CHECKPOINT if settings.parallel == 'none' else self.out}"
                )
        result = self.result(stopped or self.step < settings.max_steps, stop.name if stopped else None)
        if self.parallel.is_main:
            (self.out / "result.json").write_text(strict_json(result.to_dict(), indent=2) + "\n")
            if self.step == settings.max_steps and settings.plots:
                self._plot()
        return result

    def _loop(self, until_step: int | None, stop: StopRequest, progress: Progress, loggers: MetricsLoggers) -> bool:
        """The steps up to ``until_step`` (or max_steps), then a checkpoint; True if ``stop`` ended them."""
        settings = self.config.train
        end = settings.max_steps if until_step is None else min(until_step, settings.max_steps)
        where = device_name(self.device)
        if self.parallel.distributed:
            where = f"{self.parallel.world_size} x {where} ({self.parallel.mode})"
        if self.step < end and where not in self.devices:
            self.devices.append(where)
        first_interval = True
        interval_start, interval_steps = time.perf_counter(), 0
        stopped = False
        while self.step < end:
            self.train_step()
            interval_steps += 1
            progress.update()
            evaluate = self.step % settings.eval_every == 0 or self.step == settings.max_steps
            logged = self.step % settings.log_every == 0 or evaluate
            if logged:
                row = self._log_row(interval_steps, interval_start, first_interval)
                if evaluate:
                    row.update(self._evaluate(progress))
                if self.metrics:
                    self.metrics.write(row)
                    loggers.log(row)
                progress.logged(row)
                first_interval, interval_start, interval_steps = False, time.perf_counter(), 0
            if settings.ckpt_every and self.step % settings.ckpt_every == 0:
                saving = time.perf_counter()
                self.save()
                interval_start += time.perf_counter() - saving  # not training time
            stopping = stop.requested
            if self.parallel.distributed:  # the ranks agree at logged steps, to stop at the same one
                signum = par.max_over_ranks(stop.signum or 0, self.device, self.parallel) if logged else 0
                stopping = signum > 0
                if stopping and not stop.requested:  # another rank got it: stop by the same signal
                    stop.signum = signum
            if stopping and self.step < end:
                stopped = True
                break
        self.save()
        return stopped

    @contextlib.contextmanager
    def _metrics_loggers(self):
        """TensorBoard and trackio (``train.log_to``) on rank 0, for the steps of one ``fit``."""
        names = self.config.train.log_to if self.parallel.is_main else ()
        resume_step = self.step if self.step > 0 else None
        loggers = MetricsLoggers(
            names, self.out, self.config.to_dict(), project=self.config.train.trackio_project, resume_step=resume_step
        )
        try:
            yield loggers
        finally:
            loggers.close()

    def _log_row(self, interval_steps: int, interval_start: float, first_interval: bool) -> dict:
        losses = torch.stack(self.pending_losses).float()
        losses = par.mean_over_ranks(losses, self.parallel).cpu().tolist()  # one device sync per log
        norms = torch.stack(self.pending_norms).float().cpu().tolist()
        seconds = time.perf_counter() - interval_start  # after the device sync above
        for n in norms:
            self.spikes.update(n)
        tokens = interval_steps * self.task.tokens_per_batch
        self.train_seconds += seconds
        if not first_interval:
            self.timed_tokens += tokens
            self.timed_seconds += seconds
        self.pending_losses, self.pending_norms = [], []
        return {
            "step": self.step,
            "train_loss": sum(losses) / len(losses),
            "lr": learning_rate(self.step - 1, self.config.optim, self.config.train.schedule_steps),
            "grad_norm": norms[-1],
            "grad_norm_max": max(norms),
            "grad_spikes": self.spikes.spikes,
            "tokens": self.tokens,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "elapsed_s": self.train_seconds,
        }

    def _evaluate(self, progress: Progress | None = None) -> dict:
        self.model.eval()
        try:
            out = self.task.evaluate(self.model, self.device, self.autocast)
            if self.config.train.diagnostics:
                probe = self.task.probe_input().to(self.device)
                out.update(attention_stats(self.model, probe, self.autocast))
        finally:
            self.model.train()
        self.last_eval = {k: out[k] for k in ("val_loss", "val_loss_by_context") if k in out}
        parts = [f"step {self.step}: val loss {out['val_loss']:.4f}"]
        if "val_loss_by_context" in out:
            parts.append("by context " + ", ".join(f"{n}: {v:.4f}" for n, v in out["val_loss_by_context"].items()))
        if "val_acc" in out:
            parts.append(f"val acc {out['val_acc']:.3f}")
        line = f"[{self.config.model.attn}] " + "; ".join(parts)
        if progress is not None:
            progress.write(line)
        else:
            self.log(line)
        return out

    def result(self, stopped_early: bool, stopped_by: str | None = None) -> RunResult:
        """What the run has done so far; tokens/s leaves out each process's first logged interval (warm-up,
        compilation)."""
        if self.timed_seconds > 0:
            tokens_per_s = self.timed_tokens / self.timed_seconds
        else:
            tokens_per_s = self.tokens / self.train_seconds if self.train_seconds > 0 else None
        return RunResult(
            out_dir=str(self.out),
            attn=self.config.model.attn,
            steps=self.step,
            max_steps=self.config.train.max_steps,
            final_val_loss=self.last_eval.get("val_loss"),
            val_loss_by_context=self.last_eval.get("val_loss_by_context"),
            tokens_per_s=tokens_per_s,
            train_seconds=self.train_seconds,
            tokens=self.tokens,
            grad_spikes=self.spikes.spikes,
            stopped_early=stopped_early,
            device=" + ".join(self.devices) or device_name(self.device),
            stopped_by=stopped_by,
            # (FSDP2's shards are DTensors, whose numel is the whole parameter's)
            params=sum(p.numel() for p in self.model.parameters()),
        )

    def _plot(self) -> None:
        from .plots import plot_runs

        try:
            plot_runs({self.config.model.attn: read_metrics(self.out / "metrics.jsonl")}, self.out)
        except ImportError as error:  # no matplotlib
            self.log(f"no plots: {error}")


def _cannot_resume(problem: str, delete: Path) -> TrainError:
    return TrainError(
        f"cannot resume from {problem}. Delete {delete} to start over (without --resume), or restore it from a backup"
    )


def _check_state(state, path: Path, keys: tuple[str, ...]) -> None:
    """Raises TrainError unless ``state`` is a checkpoint of this format holding ``keys``."""
    if not isinstance(state, dict):
        raise _cannot_resume(f"{path}: expected a sigattn checkpoint (a dict), got a {type(state).__name__}", path)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"--resume: {path} has format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    missing = [key for key in keys if key not in state]
    if missing:
        raise _cannot_resume(f"{path}: the checkpoint lacks {', '.join(missing)}", path)


@contextlib.contextmanager
def _cpu_threads(count: int):
    """``count`` intra-op CPU threads inside the block, the previous number after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train(
    config: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    until_step: int | None = None,
    log: Log | None = None,
    stop: StopRequest | None = None,
) -> RunResult:
    """Runs (or with ``resume`` continues) a training run of ``config`` in ``out_dir``.

    ``until_step`` stops early at that step, with a checkpoint (as an interruption would). ``stop``: see
    ``Trainer.fit``. Raises ``TrainError``, ``ConfigError`` or ``MetricsError`` (a damaged metrics.jsonl
    line) for problems the user can fix, and ``Interrupted`` for a second signal."""
    trainer = Trainer(config, out_dir, resume=resume, log=log)
    try:
        return trainer.fit(until_step, stop=stop)
    finally:
        trainer.parallel.close()


def _silent(line: str) -> None:
    pass


__all__ = ["ConfigError", "Interrupted", "RunResult", "StopRequest", "TrainError", "Trainer", "resumed_config", "train"]
