"""`sigattn train` and `sigattn compare` as a person uses them (issue 28), driven in subprocesses: Ctrl-C
(SIGINT) and SIGTERM stop after the step with a checkpoint, print the exact resume command and exit 130/143;
`--resume --out DIR` alone continues; a finished run is extended with a larger --max-steps; each file error
is one line and a non-zero exit; logs go through the progress bar on a terminal and as plain lines
otherwise; TensorBoard and trackio receive the metrics; --json; shell completion. Micro runs of a 1-layer
GPT on generated text keep each command to seconds."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import random
import re
import select
import shlex
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
import torch

from sigattn import cli
from sigattn.train import TrainError, build_config, train
from sigattn.train import checkpoint as checkpoint_module
from sigattn.train import trainer as trainer_module
from sigattn.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "king", "queen", "doth", "speak", "of", "love", "and", "war", "upon", "thy", "noble", "heart", "my"]
TIMING_KEYS = {"tokens_per_s", "elapsed_s"}
STARTUP_TIMEOUT = 240  # seconds for a command to print its first step on a loaded 2-core CI machine


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(600)))
    return path


def micro(corpus: Path, *extra: str) -> list[str]:
    """Overrides turning the tiny preset into a run of a few milliseconds per step on generated text (one
    thread: a second one makes such small steps many times slower when the test suite shares the cores)."""
    settings = (
        "model.n_layer=1 model.d_model=32 model.n_head=2 model.block_size=16 train.batch_size=8 train.log_every=2 "
        "train.eval_every=50 train.eval_windows=4 optim.warmup_steps=2 train.plots=false train.threads=1"
    )
    return ["data.dataset=text", f"data.path={corpus}", *settings.split(), *extra]


def command_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SIGATTN_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def sigattn(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    """Runs ``sigattn ARGV`` to the end."""
    return subprocess.run(
        [sys.executable, "-m", "sigattn.cli", *argv],
        capture_output=True,
        text=True,
        env=command_env(),
        cwd=REPO,
        timeout=600,
        **kwargs,
    )


class Running:
    """A ``sigattn`` command running in the background, its stdout and stderr collected by threads."""

    def __init__(self, *argv: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sigattn.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=command_env(),
            cwd=REPO,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        streams = ((self.process.stdout, self.out), (self.process.stderr, self.err))
        self.threads = [threading.Thread(target=self._read, args=pair, daemon=True) for pair in streams]
        for thread in self.threads:
            thread.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def wait_for(self, pattern: str) -> None:
        """Waits until a stderr line matches ``pattern`` (the run is then training)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not any(re.search(pattern, line) for line in list(self.err)):
            assert self.process.poll() is None, f"ended before {pattern!r}: {''.join(self.err)}"
            assert time.monotonic() < deadline, f"no {pattern!r} in {STARTUP_TIMEOUT} s: {''.join(self.err)}"
            time.sleep(0.02)

    def finish(self) -> tuple[int, str, str]:
        code = self.process.wait(timeout=STARTUP_TIMEOUT)
        for thread in self.threads:
            thread.join(timeout=30)
        return code, "".join(self.out), "".join(self.err)


def resume_argv(stderr: str, command: str) -> list[str]:
    """The resume command the run printed, as arguments after the program (checked to be exactly that)."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"sigattn {command}: resume with: ")]
    assert len(lines) == 1, stderr
    words = shlex.split(lines[0].split("resume with: ", 1)[1])
    program = ["sigattn"] if words[0] == "sigattn" else [sys.executable, "-m", "sigattn.cli"]
    assert words[: len(program)] == program, words
    return words[len(program) :]


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


# --------------------------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_train_with_a_checkpoint_and_the_resume_command(tmp_path, corpus, sig, status):
    out = tmp_path / "run"
    running = Running("train", "--preset", "tiny", "--out", str(out), "--max-steps", "300", *micro(corpus))
    running.wait_for(r"^\[sigmoid\] step 2/300 \(0%\): loss \d+\.\d+, [\d,]+ tok/s, \d+(m\d+)?s left$")
    running.process.send_signal(sig)
    code, stdout, stderr = running.finish()
    assert code == status, stderr
    assert "Traceback" not in stderr
    step = checkpoint_module.load_checkpoint(out / "checkpoint.pt")["step"]
    assert 2 <= step < 300
    name = signal.Signals(sig).name
    assert f"[sigmoid] stopped at step {step} of 300 by {name}: checkpoint written to {out / 'checkpoint.pt'}" in stderr
    result = json.loads(stdout)
    assert (result["steps"], result["stopped_early"], result["stopped_by"]) == (step, True, name)
    assert json.loads((out / "result.json").read_text())["stopped_by"] == name
    assert resume_argv(stderr, "train") == ["train", "--resume", "--out", str(out)]
    if sig == signal.SIGTERM:
        return
    # --resume --out DIR and nothing else: the run's own config.json is the configuration.
    resumed = sigattn(*resume_argv(stderr, "train"))
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert (result["steps"], result["stopped_early"], result["stopped_by"]) == (300, False, None)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(2, 301, 2))


def test_a_signal_stops_the_whole_comparison(tmp_path, corpus):
    out = tmp_path / "cmp"
    running = Running("compare", "--preset", "tiny", "--out", str(out), "--max-steps", "200", *micro(corpus))
    running.wait_for(r"^\[sigmoid\] step 2/200")
    running.process.send_signal(signal.SIGINT)
    code, stdout, stderr = running.finish()
    assert code == 130, stderr
    assert "Traceback" not in stderr
    step = checkpoint_module.load_checkpoint(out / "sigmoid" / "checkpoint.pt")["step"]
    assert not (out / "softmax").exists()  # the other attention did not start
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGINT" and summary["softmax"] is None
    assert summary["incomplete"] == {"sigmoid": f"stopped at step {step} of 200 by SIGINT", "softmax": "not started"}
    report = (out / "report.md").read_text()
    stopped = f"sigmoid stopped at step {step} of 200 by SIGINT; softmax not started"
    assert f"**Not a finished comparison:** {stopped}" in report
    assert f"`sigattn compare --resume --out {out}`" in report
    assert "softmax  not started" in stdout
    assert resume_argv(stderr, "compare") == ["compare", "--resume", "--out", str(out)]

    resumed = sigattn(*resume_argv(stderr, "compare"), "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)  # --json: the summary alone on stdout
    assert summary == {**json.loads((out / "summary.json").read_text())}
    assert summary["incomplete"] == {} and summary["stopped_by"] is None
    assert summary["sigmoid"]["steps"] == summary["softmax"]["steps"] == 200
    assert summary["preset"] == "tiny" and "val_loss_gap" in summary
    assert "Not a finished comparison" not in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "command, attn, checkpoint",
    [("train", "sigmoid", "checkpoint.pt"), ("compare", "softmax", "softmax/checkpoint.pt")],
    ids=["train", "compare-in-its-softmax-run"],
)
def test_a_second_signal_stops_at_once(tmp_path, corpus, monkeypatch, capsys, command, attn, checkpoint):
    """The second Ctrl-C interrupts the step in progress; the run keeps its last checkpoint, which the message
    names (a comparison's: the run in progress's)."""
    step = trainer_module.Trainer.train_step

    def step_then_two_signals(self):
        step(self)
        if self.step == 4 and self.config.model.attn == attn:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step_then_two_signals)
    out = tmp_path / "run"
    argv = [command, "--preset", "tiny", "--out", str(out), "--max-steps", "8", *micro(corpus, "train.ckpt_every=2")]
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before
    assert f"stopped at once by a second SIGINT; the run keeps its last checkpoint ({out / checkpoint})" in err
    # interrupted inside step 4, before its checkpoint: the last one is step 2's (ckpt_every=2)
    assert checkpoint_module.load_checkpoint(out / checkpoint)["step"] == 2


# -------------------------------------------------------------------------------------------- resuming


def test_extending_a_finished_run_keeps_its_schedule(tmp_path, corpus):
    """8 steps, then --resume --max-steps 12: the 4 new steps train at min_lr, bit for bit as a fresh
    12-step run whose cosine ends at step 8 (train.decay_steps=8)."""
    out = tmp_path / "run"
    train(build_config("tiny", micro(corpus, "train.eval_every=4"), max_steps=8), out, log=lambda line: None)
    extended = sigattn("train", "--resume", "--out", str(out), "--max-steps", "12")
    assert extended.returncode == 0, extended.stderr
    assert json.loads(extended.stdout)["steps"] == 12
    saved = json.loads((out / "config.json").read_text())["train"]
    assert (saved["max_steps"], saved["decay_steps"]) == (12, 8)
    fresh = build_config(
        "tiny", micro(corpus, "train.eval_every=4", "train.decay_steps=8", "train.progress=false"), max_steps=12
    )
    train(fresh, tmp_path / "fresh", log=lambda line: None)
    rows, expected = read_metrics(out / "metrics.jsonl"), read_metrics(tmp_path / "fresh" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert comparable(rows) == comparable(expected)
    assert [r["lr"] for r in rows if r["step"] > 8] == [3e-4, 3e-4]  # optim.min_lr of the tiny preset
    shorter = sigattn("train", "--resume", "--out", str(out), "--max-steps", "10")
    assert shorter.returncode == 2
    assert "train.max_steps=10 is below the step the run in" in shorter.stderr and "(12)" in shorter.stderr


def test_resume_accepts_cosmetic_changes_and_lists_the_others(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    config = build_config("tiny", micro(corpus, "train.progress=false"), max_steps=8)
    train(config, out, until_step=4, log=lambda line: None)
    argv = ["train", "--resume", "--out", str(out), "model.n_layer=2", "lr=0.01", "train.seed=3"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    differences = "model.n_layer: 1 -> 2; optim.lr: 0.003 -> 0.01; train.seed: 0 -> 3"
    assert (
        err == f"sigattn train: error: --resume continues the run saved in {out} with its own settings; "
        f"these differ: {differences}\n"
    )
    cosmetic = [
        "train.progress=true",
        "train.log_every=4",
        "train.eval_every=8",
        "train.ckpt_every=2",
        "train.diagnostics=false",
        "train.threads=1",
        "train.plots=true",
    ]
    assert cli.main(["train", "--resume", "--out", str(out), *cosmetic]) == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())["train"]
    assert (saved["log_every"], saved["threads"], saved["diagnostics"]) == (4, 1, False)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [2, 4, 8]
    assert (out / "loss.png").is_file()


def test_threads_are_set_for_the_run_and_restored(tmp_path, corpus):
    before = torch.get_num_threads()
    result = train(
        build_config("tiny", micro(corpus, "train.threads=1", "train.progress=false"), max_steps=2),
        tmp_path / "run",
        log=lambda line: None,
    )
    assert result.device.endswith(", 1 threads)")
    assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------------------------- files


FILE_ERRORS = [
    "train --out is a file",
    "compare --out is a file",
    "experiment --out is a file",
    "missing parent of --out",
    "resume a folder that does not exist",
    "resume a folder without config.json",
    "resume with a damaged config.json",
    "compare --resume without compare.json",
    "a run that fails at its start",
]


def file_error_cases(tmp: Path, corpus: Path) -> dict[str, tuple[list[str], str]]:
    """FILE_ERRORS' name -> (argv, the start of the one error line expected on stderr)."""
    (tmp / "a-file").write_text("not a folder\n")
    (tmp / "no-config").mkdir()
    (tmp / "bad-config").mkdir()
    (tmp / "bad-config" / "config.json").write_text('{"task": "lm", "model": {')
    data = micro(corpus)
    return {
        "train --out is a file": (
            ["train", "--preset", "tiny", "--out", str(tmp / "a-file"), *data],
            f"sigattn train: error: --out {tmp / 'a-file'} is a file, not a folder: choose another --out",
        ),
        "compare --out is a file": (
            ["compare", "--preset", "tiny", "--out", str(tmp / "a-file"), *data],
            f"sigattn compare: error: --out {tmp / 'a-file'} is a file, not a folder: choose another --out",
        ),
        "experiment --out is a file": (
            ["experiment", "regularity", "--quick", "--out", str(tmp / "a-file")],
            f"sigattn experiment: error: --out {tmp / 'a-file'} is a file, not a folder: choose another --out",
        ),
        "missing parent of --out": (
            ["train", "--preset", "tiny", "--out", str(tmp / "typo" / "run"), *data],
            f"sigattn train: error: --out {tmp / 'typo' / 'run'}: the folder {tmp / 'typo'} does not exist: create it "
            f"first (mkdir -p {tmp / 'typo'}) or choose another --out",
        ),
        "resume a folder that does not exist": (
            ["train", "--resume", "--out", str(tmp / "nothing")],
            f"sigattn train: error: --resume: no folder {tmp / 'nothing'}: give the --out of the run",
        ),
        "resume a folder without config.json": (
            ["train", "--resume", "--out", str(tmp / "no-config")],
            f"sigattn train: error: --resume: no {tmp / 'no-config' / 'config.json'}: give the --out of a run",
        ),
        "resume with a damaged config.json": (
            ["train", "--resume", "--out", str(tmp / "bad-config")],
            f"sigattn train: error: cannot read {tmp / 'bad-config' / 'config.json'} (",
        ),
        "compare --resume without compare.json": (
            ["compare", "--resume", "--out", str(tmp / "no-config")],
            f"sigattn compare: error: --resume: no comparison in {tmp / 'no-config'} (no compare.json)",
        ),
        "a run that fails at its start": (
            ["train", "--preset", "tiny", "--out", str(tmp / "failed" / "run"), *micro(tmp / "missing.txt")],
            f"sigattn train: error: data: no such text file: {tmp / 'missing.txt'}",
        ),
    }


@pytest.fixture(scope="module")
def file_errors(tmp_path_factory, corpus) -> tuple[Path, dict]:
    """Every file-error command, run at once (each is mostly Python's start-up): name -> (process, expected)."""
    tmp = tmp_path_factory.mktemp("files")
    (tmp / "failed").mkdir()
    cases = file_error_cases(tmp, corpus)
    assert list(cases) == FILE_ERRORS
    running = {name: (Running(*argv), expected) for name, (argv, expected) in cases.items()}
    return tmp, {name: (process.finish(), expected) for name, (process, expected) in running.items()}


@pytest.mark.parametrize("case", FILE_ERRORS)
def test_each_file_error_is_one_line(file_errors, case):
    tmp, results = file_errors
    (code, stdout, stderr), expected = results[case]
    assert code == 2 and stdout == "", stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), stderr
    if case == "a run that fails at its start":
        assert list((tmp / "failed").iterdir()) == []  # the folder it created is gone
    if case == "missing parent of --out":
        assert not (tmp / "typo").exists()


def test_a_reader_that_goes_away_is_not_a_traceback():
    """`sigattn info --json | head`: stdout's reader is gone before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        argv = [sys.executable, "-m", "sigattn.cli", "info", "--json"]
        result = subprocess.run(
            argv, stdout=write_end, stderr=subprocess.PIPE, text=True, env=command_env(), cwd=REPO, timeout=300
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141  # 128 + SIGPIPE, as a shell reports a process killed by it
    assert result.stderr == ""


# -------------------------------------------------------------------------------------------- watching


def run_in_terminal(argv: list[str], columns: int = 120) -> tuple[int, str]:
    """Runs ``sigattn ARGV`` with a pseudo-terminal as its stdin, stdout and stderr; returns its status and
    everything it wrote to the terminal."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "sigattn.cli", *argv],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=command_env(),
        cwd=REPO,
        close_fds=True,
    )
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if not ready:
            if process.poll() is not None:
                break
            continue
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    return process.wait(timeout=60), output.decode(errors="replace")


def test_on_a_terminal_lines_are_written_through_the_progress_bar(tmp_path, corpus):
    """Each evaluation line starts a terminal line of its own: the bar is cleared first (before, the line was
    written after the bar's text, `…tok/s][sigmoid] step 100: val loss`)."""
    argv = ["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--max-steps", "60"]
    code, screen = run_in_terminal([*argv, *micro(corpus, "train.eval_every=20")])
    assert code == 0, screen
    assert re.search(r"sigmoid: +\d+%\|", screen), "no progress bar on the terminal"
    evaluations = [line for line in screen.split("\n") if "val loss" in line]
    assert len(evaluations) == 3, screen
    for line in evaluations:
        shown = line.rstrip("\r").split("\r")[-1]  # what remains on the terminal line
        assert re.fullmatch(r"\[sigmoid\] step \d+: val loss \d\.\d+; by context .*", shown), repr(line)
    assert not re.search(r"step \d+/60 \(", screen)  # no plain progress lines on a terminal


TRACKIO_READ = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
print(json.dumps(SQLiteStorage.get_logs("sigattn", sys.argv[1])))
"""


@pytest.mark.parametrize("logger", ["tensorboard", "trackio"])
def test_metrics_go_to_tensorboard_and_trackio(tmp_path, corpus, monkeypatch, logger):
    """Each logger receives every metrics row, flattened, and a resumed run continues its record (here a
    finished run extended): TensorBoard drops the steps after the checkpoint, trackio resumes the run of the
    same name. trackio is read in a process of its own: it fixes its folder ($TRACKIO_DIR) on import."""
    pytest.importorskip(logger, reason=f"{logger} is not installed: pip install 'sigattn[{logger}]'")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # the commands below inherit it
    out = tmp_path / "runs" / "logged"
    out.parent.mkdir()
    overrides = micro(corpus, f"train.log_to={logger}", "train.eval_every=4")
    first = sigattn("train", "--preset", "tiny", "--out", str(out), "--max-steps", "4", *overrides)
    assert first.returncode == 0, first.stderr
    resumed = sigattn("train", "--resume", "--out", str(out), "--max-steps", "8")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["steps"] == 8  # stdout holds the result alone, the loggers' lines none of it
    rows = read_metrics(out / "metrics.jsonl")
    expected = {r["step"]: r["train_loss"] for r in rows}
    assert list(expected) == [2, 4, 6, 8]
    if logger == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        logged = sorted((e.step, e.value) for e in events.Scalars("train_loss"))  # float32 in the event files
        assert [step for step, _ in logged] == list(expected)
        assert [value for _, value in logged] == pytest.approx(list(expected.values()), rel=1e-6)
        tags = set(events.Tags()["scalars"])
        assert {"lr", "grad_norm", "val_loss", "val_loss_by_context/16", "attn_sparsity/layer0"} <= tags
        assert [e.step for e in events.Scalars("val_loss")] == [4, 8]
    else:
        read = subprocess.run(
            [sys.executable, "-c", TRACKIO_READ, "runs/logged"],
            capture_output=True,
            text=True,
            env=command_env(),
            timeout=300,
        )
        assert read.returncode == 0, read.stderr
        logs = json.loads(read.stdout)
        assert [entry["step"] for entry in logs] == list(expected)
        assert [entry["train_loss"] for entry in logs] == pytest.approx(list(expected.values()))
        assert logs[1]["val_loss_by_context/16"] == pytest.approx(rows[1]["val_loss_by_context"]["16"])


def test_tensorboard_drops_the_steps_logged_after_the_checkpoint(tmp_path, corpus):
    """A crash after step 6 was logged but before its checkpoint: the resumed run logs 6 again, once."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install 'sigattn[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = build_config(
        "tiny", micro(corpus, "train.log_to=tensorboard", "train.ckpt_every=4", "train.progress=false"), max_steps=8
    )
    crashed = trainer_module.Trainer(config, tmp_path, log=lambda line: None)
    crashed.fit(until_step=4)  # checkpoint at 4
    crashed.save = lambda: None  # steps 5-6 are logged, never checkpointed
    crashed.fit(until_step=6)
    train(config, tmp_path, resume=True, log=lambda line: None)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train_loss")]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [step for step, _ in logged] == [2, 4, 6, 8]
    assert [value for _, value in logged] == pytest.approx([r["train_loss"] for r in rows], rel=1e-6)


def test_a_missing_logger_package_is_named_before_the_run(tmp_path, corpus, monkeypatch):
    from sigattn.train import loggers

    monkeypatch.setitem(loggers.REQUIREMENTS, "tensorboard", ("sigattn_no_such_module", "tensorboard"))
    config = build_config("tiny", micro(corpus, "train.log_to=tensorboard"), max_steps=2)
    needs = r"train.log_to=tensorboard needs the sigattn_no_such_module package: pip install 'sigattn\[tensorboard\]'"
    with pytest.raises(TrainError, match=needs):
        train(config, tmp_path / "run", log=lambda line: None)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ completion


def complete(script: str, *words: str) -> list[str]:
    """What the bash completion script offers for the command line ``words`` (the last one being typed)."""
    probe = (
        f"{script}\nCOMP_WORDS=({' '.join(shlex.quote(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        "_sigattn_complete; printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    result = subprocess.run(["bash", "--norc", "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs bash")
def test_bash_completion(capsys):
    assert cli.main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert script.rstrip().endswith("complete -o default -F _sigattn_complete sigattn")
    assert complete(script, "sigattn", "co") == ["compare", "convert", "completion"]
    assert complete(script, "sigattn", "train", "--re") == ["--resume"]
    assert complete(script, "sigattn", "compare", "--js") == ["--json"]
    assert complete(script, "sigattn", "train", "--attn", "so") == ["softmax"]
    assert set(complete(script, "sigattn", "train", "--preset", "")) >= {"tiny", "shakespeare-char", "digits-vit"}
    assert complete(script, "sigattn", "train", "model.n_la") == ["model.n_layer="]
    assert complete(script, "sigattn", "train", "train.log") == ["train.log_every=", "train.log_to="]
    assert complete(script, "sigattn", "experiment", "k") == ["ksum"]
    assert complete(script, "sigattn", "train", "lr", "=", "") == []  # a value: left to file-name completion
    assert cli.main(["completion", "zsh"]) == 0
    assert capsys.readouterr().out.startswith("autoload -U +X compinit && compinit\nautoload -U +X bashcompinit")
