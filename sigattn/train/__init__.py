"""Training recipes: configs and presets, the trainer, diagnostics, plots and the sigmoid/softmax comparison.

config = build_config("tiny", ["model.n_layer=2"], attn="sigmoid")
result = train(config, "runs/tiny-sigmoid")          # or resume=True to continue (result.stopped_by: a signal)
summary = compare("tiny", "runs/tiny-compare")       # both attentions, summary.json, report.md, plots

The command line over these (``sigattn train``, ``sigattn compare``) is ``commands``; what a person watching
a run sees is ``progress``; TensorBoard and trackio logging is ``loggers``.
"""

from .compare import compare
from .config import ConfigError, DataConfig, OptimConfig, RunConfig, TrainSettings
from .presets import build_config, load_preset, preset_names
from .trainer import RunResult, Trainer, TrainError, train

__all__ = [
    "ConfigError",
    "DataConfig",
    "OptimConfig",
    "RunConfig",
    "RunResult",
    "TrainError",
    "TrainSettings",
    "Trainer",
    "build_config",
    "compare",
    "load_preset",
    "preset_names",
    "train",
]
