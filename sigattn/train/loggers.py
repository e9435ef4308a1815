"""Where a run's metrics rows go besides ``metrics.jsonl``: TensorBoard and trackio (``train.log_to``).

Both are optional packages (``pip install 'sigattn[tensorboard]'``, ``'sigattn[trackio]'``); a run that names
one that is not installed fails at its start with a TrainError-ready message (``check_available``), not
after training. Each receives every metrics row as scalars: nested values are flattened, so
``val_loss_by_context["128"]`` becomes ``val_loss_by_context/128`` and ``attn_sparsity[0]``
``attn_sparsity/layer0``.

    tensorboard  event files in OUT/tensorboard/ (``tensorboard --logdir OUT``); a resumed run drops the
                 events logged after its checkpoint (``purge_step``), as metrics.jsonl does
    trackio      the project ``train.trackio_project``, the run named after OUT (its last two path parts,
                 e.g. ``cmp/sigmoid``) and resumed under that name; stored where trackio keeps its projects
                 ($TRACKIO_DIR, by default under the Hugging Face cache); ``trackio show`` opens the dashboard
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

# The module each logger needs, and the extra that installs it.
REQUIREMENTS = {"tensorboard": ("tensorboard", "tensorboard"), "trackio": ("trackio", "trackio")}
TENSORBOARD_DIR = "tensorboard"


def check_available(names: tuple[str, ...]) -> str | None:
    """None if every logger in ``names`` can be imported, else a message saying what to install."""
    for name in names:
        module, extra = REQUIREMENTS[name]
        if importlib.util.find_spec(module) is None:
            return f"train.log_to={name} needs the {module} package: pip install 'sigattn[{extra}]' (or drop {name})"
    return None


def scalars(row: dict) -> dict[str, float]:
    """A metrics row as flat ``name -> number`` pairs (the step itself and missing values left out)."""
    out = {}
    for key, value in row.items():
        if key == "step" or value is None:
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if v is not None})
        elif isinstance(value, list | tuple):
            out.update({f"{key}/layer{i}": float(v) for i, v in enumerate(value)})
        elif isinstance(value, int | float):
            out[key] = float(value)
    return out


def run_name(out: Path) -> str:
    """The run's name for trackio: the last two parts of its folder (``runs/tiny-sigmoid``, ``cmp/softmax``)."""
    parts = out.resolve().parts
    return "/".join(parts[-2:])


class TensorBoardLogger:
    def __init__(self, out: Path, config: dict, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at or after it, logged before an interruption, are dropped from the view.
        self.writer = SummaryWriter(
            str(out / TENSORBOARD_DIR), purge_step=None if resume_step is None else resume_step + 1
        )
        if resume_step is None:
            self.writer.add_text("config", "```\n" + _config_text(config) + "\n```", 0)

    def log(self, row: dict) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class TrackioLogger:
    def __init__(self, out: Path, config: dict, project: str, resume: bool):
        import trackio

        self.trackio = trackio
        # trackio prints its banner on stdout, which holds the command's result (JSON): send it to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            self.run = trackio.init(
                project=project, name=run_name(out), config=config, resume="allow" if resume else "never", embed=False
            )

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def close(self) -> None:
        # trackio.finish (not Run.finish) also forgets the run, whose finish trackio would otherwise repeat,
        # printing on stdout, when the process exits.
        with contextlib.redirect_stdout(sys.stderr):
            self.trackio.finish()


class MetricsLoggers:
    """The loggers ``names`` asks for, opened for the run in ``out`` (``resume_step``: the checkpoint's step
    when the run is resumed); ``log`` sends a row to each."""

    def __init__(self, names: tuple[str, ...], out: Path, config: dict, *, project: str, resume_step: int | None):
        self.loggers: list = []
        try:
            for name in names:
                if name == "tensorboard":
                    self.loggers.append(TensorBoardLogger(out, config, resume_step))
                else:
                    self.loggers.append(TrackioLogger(out, config, project, resume=resume_step is not None))
        except BaseException:
            self.close()
            raise

    def log(self, row: dict) -> None:
        for logger in self.loggers:
            logger.log(row)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []


def _config_text(config: dict) -> str:
    lines = []
    for section, values in config.items():
        if isinstance(values, dict):
            lines += [f"{section}.{key} = {value!r}" for key, value in values.items()]
        else:
            lines.append(f"{section} = {values!r}")
    return "\n".join(lines)
