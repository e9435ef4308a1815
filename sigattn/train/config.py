"""A training run's settings: one ``RunConfig`` of five parts (task, model, data, optim, train), read from a
preset file and changed by ``key=value`` overrides.

    task = "lm" | "vit"          the model: GPTConfig for "lm", ViTConfig for "vit"
    [model]                      the model config's fields
    [data] [optim] [train]       DataConfig, OptimConfig, TrainSettings below

An override names a field as ``section.field`` (``model.n_layer=6``) or, when only one section has it,
as ``field`` (``n_layer=6``). Values are parsed by the field's type: ints, floats, booleans
(true/false), one of a field's choices, ``none`` for an optional field, comma-separated ints for a tuple.
Every bad name or value raises ``ConfigError`` saying which setting and what it accepts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from ..models import GPTConfig, ViTConfig
from ..nn.config import check_fields, check_finite, literal_choices

MODEL_CONFIGS = {"lm": GPTConfig, "vit": ViTConfig}
# Model fields that the data decides (the tokenizer's vocabulary, the images' shape and classes).
DERIVED = {"lm": {"vocab_size"}, "vit": {"image_size", "channels", "n_classes"}}
TASK_DATASETS = {"lm": ("shakespeare", "text", "pycode"), "vit": ("digits", "images")}


class ConfigError(ValueError):
    """A bad preset, setting name or value; the message names it and says what is expected."""


@dataclass
class DataConfig:
    """Where the data comes from and how text is tokenised."""

    dataset: Literal["shakespeare", "text", "pycode", "digits", "images"] = "shakespeare"
    # shakespeare: the archive, a folder holding it, or any text file (default: the cache folder);
    # text: a UTF-8 file (required); pycode: the folders to read, separated by os.pathsep (default: the
    # environment's stdlib and site-packages; sigattn.data.pycode); images: an .npz with images and labels
    # (required).
    path: str | None = None
    tokenizer: Literal["char", "byte", "bpe"] = "char"
    vocab_size: int = 512  # BPE's vocabulary size
    val_fraction: float = 0.1  # held out: of the tokens (text), of the files by content hash (pycode), of images
    max_bytes: int | None = None  # pycode: a fixed slice of at most this many bytes of source; none: all

    def __post_init__(self):
        check_fields(self)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.dataset in ("text", "images") and not self.path:
            raise ValueError(f"dataset={self.dataset!r} needs path=FILE")
        if self.dataset == "pycode" and self.tokenizer != "bpe":
            raise ValueError(
                f"dataset='pycode' is tokenised by its own BPE: needs tokenizer='bpe', got {self.tokenizer!r}"
            )
        if self.max_bytes is not None:
            if self.dataset != "pycode":
                raise ValueError(f"max_bytes is for dataset='pycode' only, not {self.dataset!r}: set it to none")
            if isinstance(self.max_bytes, bool) or self.max_bytes < 1:
                raise ValueError(f"max_bytes must be a positive int or none, got {self.max_bytes!r}")


@dataclass
class OptimConfig:
    """AdamW with linear warmup to ``lr`` then cosine decay to ``min_lr`` at ``train.max_steps``."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices and embeddings only, not on norms, biases or LayerScale
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # the largest global gradient norm; 0 turns clipping off

    def __post_init__(self):
        # NaN passes the comparisons below, and AdamW checks its arguments only when the run builds it.
        check_finite(self, "lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr!r}, min_lr={self.min_lr!r}")
        for name in ("warmup_steps", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


LOGGERS = ("tensorboard", "trackio")  # what train.log_to may name


@dataclass
class TrainSettings:
    """The loop: length, batch, logging, evaluation, checkpoints, device and speed options.

    ``RESUMABLE_CHANGES`` lists the fields that may change when a run is resumed (they do not change what
    is computed); ``max_steps`` may change too, by the rule in ``sigattn.train.trainer``."""

    max_steps: int = 1000
    """Optimizer steps of the run. A larger value on --resume extends the run (the learning rate stays on the
    schedule the run started with: see ``decay_steps``)."""
    decay_steps: int | None = None
    """The step at which the cosine schedule reaches ``optim.min_lr``; none: ``max_steps``. A run extended
    on --resume keeps the value it had (the steps past it train at ``min_lr``)."""
    batch_size: int = 32
    """The global batch, in sequences (lm) or images (vit)."""
    seed: int = 0
    """Seeds the model's initialisation, the batches and dropout."""
    log_every: int = 10
    """One metrics.jsonl row (and, when the output is not a terminal, one progress line) per this many
    steps, and one at each evaluation."""
    eval_every: int = 100
    """Validation (and diagnostics) every this many steps, and at the last step."""
    eval_windows: int = 64
    """Validation windows (lm) per context length; all validation images (vit)."""
    eval_context_lengths: tuple[int, ...] = ()
    """lm: also evaluate at these context lengths; the training context (model.block_size) always."""
    ckpt_every: int = 0
    """A checkpoint every this many steps; 0: at the end (and on Ctrl-C or SIGTERM) only."""
    diagnostics: bool = True
    """Attention-output norm and attention sparsity per layer at each evaluation."""
    spike_factor: float = 3.0
    """A gradient-norm spike: above this many times its running average."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the steps run; auto: CUDA if available."""
    threads: int = 0
    """CPU threads for PyTorch's operations during the run (``torch.set_num_threads``); 0: PyTorch's default
    (one per core). On a machine shared with other work fewer threads can be much faster. Results are
    bit-identical only at the same number of threads."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on the CPU."""
    compile: Literal["auto", "on", "off", "cudagraphs"] = "auto"
    """cudagraphs: ``torch.compile(mode="reduce-overhead")`` on one CUDA device, which replays each step's
    kernels from CUDA graphs (small models spend most of a step launching them). auto: cudagraphs on one
    CUDA device, "on" under data parallelism, "off" on the CPU."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward instead of keeping them."""
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    """Data parallelism under torchrun (sigattn/train/parallel.py); batch_size is the global batch. Under
    torchrun with more than one process, "none" is an error rather than N copies of one run."""
    sdpa_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    """Softmax's SDPA kernel."""
    progress: bool = True
    """Progress reports: a bar (tqdm) with loss and tokens/s on a terminal, else a plain line per logged
    step with loss, tokens/s and the time left."""
    plots: bool = True
    """loss.png and diagnostics.png in the run folder at the end."""
    log_to: tuple[str, ...] = ()
    """Also send every metrics row to these (comma-separated): tensorboard (event files in OUT/tensorboard/;
    ``pip install 'sigattn[tensorboard]'``), trackio (project ``trackio_project``, run named after OUT;
    ``pip install 'sigattn[trackio]'``)."""
    trackio_project: str = "sigattn"
    """The trackio project the runs are logged to (with ``log_to=trackio``)."""

    def __post_init__(self):
        check_fields(self)
        for name in ("max_steps", "batch_size", "log_every", "eval_every", "eval_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.decay_steps is not None and (isinstance(self.decay_steps, bool) or self.decay_steps < 1):
            raise ValueError(f"decay_steps must be a positive int or none, got {self.decay_steps!r}")
        check_finite(self, "spike_factor", positive=True)
        if self.ckpt_every < 0:
            raise ValueError(f"ckpt_every must be >= 0, got {self.ckpt_every}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: PyTorch's default), got {self.threads}")
        if any(n < 1 for n in self.eval_context_lengths):
            raise ValueError(f"eval_context_lengths must be positive, got {self.eval_context_lengths}")
        unknown = [name for name in self.log_to if name not in LOGGERS]
        if unknown:
            raise ValueError(
                f"log_to must name some of {', '.join(map(repr, LOGGERS))} (comma-separated), got {unknown[0]!r}"
            )
        if len(set(self.log_to)) != len(self.log_to):
            raise ValueError(f"log_to names a logger twice: {','.join(self.log_to)}")
        if not self.trackio_project:
            raise ValueError("trackio_project must not be empty")

    @property
    def schedule_steps(self) -> int:
        """The step at which the learning rate reaches ``optim.min_lr``."""
        return self.decay_steps or self.max_steps


# Settings that do not change what a run computes: they may differ when it is resumed.
RESUMABLE_CHANGES = frozenset(
    {
        "train.log_every",
        "train.eval_every",
        "train.ckpt_every",
        "train.diagnostics",
        "train.progress",
        "train.plots",
        "train.log_to",
        "train.trackio_project",
        "train.threads",
    }
)


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "train": TrainSettings}


@dataclass
class RunConfig:
    """Everything a run needs; ``to_dict``/``from_dict`` round-trip it through JSON and TOML."""

    task: Literal["lm", "vit"]
    model: GPTConfig | ViTConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSettings = field(default_factory=TrainSettings)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for name in ("eval_context_lengths", "log_to"):  # as JSON and TOML hold them
            out["train"][name] = list(getattr(self.train, name))
        for name in DERIVED[self.task]:
            out["model"].pop(name)
        return out

    @classmethod
    def from_dict(cls, raw: dict, overrides: list[str] = ()) -> RunConfig:
        """Builds and checks a config from a preset's dict and ``key=value`` overrides."""
        raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
        task = raw.get("task")
        if task not in MODEL_CONFIGS:
            raise ConfigError(f"task must be one of {', '.join(map(repr, MODEL_CONFIGS))}; got {task!r}")
        classes = {"model": MODEL_CONFIGS[task], **SECTIONS}
        unknown = set(raw) - {"task", *classes}
        if unknown:
            raise ConfigError(f"unknown section(s) {sorted(unknown)}: expected task, {', '.join(classes)}")
        for section in classes:
            raw.setdefault(section, {})
            if not isinstance(raw[section], dict):
                raise ConfigError(
                    f"{section} must be a section ([{section}] with key = value lines), got {raw[section]!r}"
                )
            for key in raw[section]:
                _settable(task, section, key, classes)
        for item in overrides:
            section, key, value = _parse_override(item, task, classes)
            raw[section][key] = value
        parts = {}
        for section, klass in classes.items():
            values = {k: _coerce(f"{section}.{k}", v, _hints(klass)[k]) for k, v in raw[section].items()}
            try:
                parts[section] = klass(**values)
            except ValueError as error:
                raise ConfigError(f"[{section}] {error}") from None
        if parts["data"].dataset not in TASK_DATASETS[task]:
            raise ConfigError(
                f"data.dataset must be one of {', '.join(map(repr, TASK_DATASETS[task]))} for task {task!r}; "
                f"got {parts['data'].dataset!r}"
            )
        return cls(task=task, **parts)


def _hints(klass) -> dict:
    return typing.get_type_hints(klass)


def setting_names(task: str) -> list[str]:
    """Every ``section.field`` an override may name for ``task``."""
    classes = {"model": MODEL_CONFIGS[task], **SECTIONS}
    return [
        f"{section}.{f.name}"
        for section, klass in classes.items()
        for f in dataclasses.fields(klass)
        if not (section == "model" and f.name in DERIVED[task])
    ]


def _settable(task: str, section: str, key: str, classes: dict) -> None:
    names = {f.name for f in dataclasses.fields(classes[section])}
    if key in DERIVED[task] and section == "model":
        raise ConfigError(f"model.{key} is set from the data and cannot be given")
    if key not in names:
        raise ConfigError(
            f"unknown setting {section}.{key}: [{section}] has {', '.join(sorted(names - DERIVED[task]))}"
        )


def _parse_override(item: str, task: str, classes: dict) -> tuple[str, str, object]:
    """``section.key=value`` or ``key=value`` -> (section, key, typed value)."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"an override must look like key=value (e.g. model.n_layer=4), got {item!r}")
    name, text = (s.strip() for s in item.split("=", 1))
    if "." in name:
        section, key = name.split(".", 1)
        if section not in classes:
            raise ConfigError(f"unknown section {section!r} in {item!r}: expected one of {', '.join(classes)}")
    else:
        owners = [s for s, k in classes.items() if name in {f.name for f in dataclasses.fields(k)}]
        owners = [s for s in owners if not (s == "model" and name in DERIVED[task])]
        if len(owners) > 1:
            choices = " or ".join(f"{s}.{name}" for s in owners)
            raise ConfigError(f"{name!r} is in several sections: write {choices}")
        if not owners:
            raise ConfigError(f"unknown setting {name!r}: expected one of {', '.join(setting_names(task))}")
        section, key = owners[0], name
    _settable(task, section, key, classes)
    return section, key, _parse_text(f"{section}.{key}", text, _hints(classes[section])[key])


def _unwrap(annotation) -> tuple[object, bool]:
    """(the type, whether None is allowed) of ``X`` or ``X | None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return next(a for a in args if a is not type(None)), type(None) in args
    return annotation, False


def _item_type(annotation) -> type:
    """The item type of ``tuple[X, ...]``."""
    return typing.get_args(annotation)[0]


def _type_name(annotation) -> str:
    base, optional = _unwrap(annotation)
    choices = literal_choices(base)
    if choices is not None:
        name = "one of " + ", ".join(map(repr, choices))
    elif typing.get_origin(base) is tuple:
        name = "comma-separated ints" if _item_type(base) is int else "comma-separated names"
    else:
        name = {int: "an int", float: "a number", bool: "true or false", str: "a string"}[base]
    return name + (" or none" if optional else "")


def _parse_text(key: str, text: str, annotation):
    """The value of an override's text, by the field's annotation."""
    base, optional = _unwrap(annotation)
    if optional and text.lower() in ("none", "null"):
        return None
    choices = literal_choices(base)
    bools = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
    try:
        if choices is not None:
            if text not in choices:
                raise ValueError
            return text
        if typing.get_origin(base) is tuple:
            if _item_type(base) is str and text.lower() in ("", "none"):
                return ()
            return tuple(_item_type(base)(part.strip()) for part in text.split(",") if part.strip())
        if base is bool:
            return bools[text.lower()]
        return base(text)  # int, float or str
    except (ValueError, KeyError):
        raise ConfigError(f"{key} expects {_type_name(annotation)}, got {text!r}") from None


def _coerce(key: str, value, annotation):
    """A preset's (TOML or JSON) value checked against the field's type; ints are accepted for floats
    and lists for tuples."""
    base, optional = _unwrap(annotation)
    choices = literal_choices(base)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if value is None:
        ok = optional
    elif choices is not None:
        ok = value in choices
    elif typing.get_origin(base) is tuple:
        item = _item_type(base)
        ok = isinstance(value, list | tuple) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    elif base is float:
        ok = is_int or isinstance(value, float)
        value = float(value) if ok else value
    elif base is int:
        ok = is_int
    else:
        ok = isinstance(value, base)
    if not ok:
        raise ConfigError(f"{key} expects {_type_name(annotation)}, got {value!r}")
    return value
