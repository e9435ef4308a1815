"""``sigattn bench``. Without a GPU: FLOP counting, argument parsing, a sweep whose providers fail, the
table, JSON and plot, and the FlexAttention formulation of sigmoid attention (FlexAttention runs eagerly
on the CPU, forward only). With CUDA (``gpu``): the compiled formulation with gradients, and a tiny run of
the command itself."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_within_tolerance_rule

from sigattn import cli
from sigattn.bench import command
from sigattn.bench import inference as inf
from sigattn.bench import sweep as bench
from sigattn.bench.sweep import MEMORY_MODE, MODES, Provider, Shape, attention_flops
from sigattn.ops.sigmoid_attn.reference import sigmoid_attn_reference
from sigattn.runinfo import run_meta, write_json

ROW_KEYS = {
    "provider",
    "mode",
    "batch",
    "heads",
    "seqlen",
    "headdim",
    "causal",
    "dtype",
    "ms",
    "tflops",
    "peak_mem_mb",
    # the configuration matrix's fields (issue 26), at their plain values in the sweep
    "window",
    "alibi",
    "head_bias",
    "deterministic",
    "dropout",
    "headdim_v",
    "kv_heads",
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def parse(*argv: str):
    return cli.build_parser().parse_args(["bench", *argv])


# ---------------------------------------------------------------------------------------------- FLOPs


def test_flops_count_the_unmasked_pairs():
    full, causal = Shape(2, 3, 5, 7, False, "bf16"), Shape(2, 3, 5, 7, True, "bf16")
    assert attention_flops(full, "fwd") == 4 * 2 * 3 * 25 * 7
    assert attention_flops(causal, "fwd") == 4 * 2 * 3 * 15 * 7  # 5 + 4 + 3 + 2 + 1 pairs per head
    for shape in (full, causal):
        forward = attention_flops(shape, "fwd")
        assert attention_flops(shape, "bwd") == 2.5 * forward
        assert attention_flops(shape, "fwd+bwd") == 3.5 * forward
        assert attention_flops(shape, MEMORY_MODE) == 3.5 * forward


def test_sweep_is_flash_attn_setup():
    shapes = bench.sweep_shapes(bench.HEADDIMS, bench.SEQLENS, [True, False], "bf16")
    assert len(shapes) == 2 * 6 * 2
    for s in shapes:
        assert s.batch * s.seqlen == 16384 and s.heads * s.headdim == 2048
        full_forward = 4 * 16384 * s.seqlen * 2048  # 4 * tokens * seqlen * hidden
        expected = full_forward * (s.seqlen + 1) / (2 * s.seqlen) if s.causal else full_forward
        assert attention_flops(s, "fwd") == expected


def test_row_tflops_and_schema():
    row = bench.make_row("sdpa-flash", Shape(1, 2, 1024, 64, False, "bf16"), "fwd", ms=0.5, peak_mib=12.345)
    assert set(row) == ROW_KEYS
    assert row["tflops"] == round(4 * 2 * 1024 * 1024 * 64 / 0.5e-3 / 1e12, 2)
    assert row["peak_mem_mb"] == 12.3 and row["dtype"] == "bf16" and row["causal"] is False


# -------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("mode", MODES)
def test_timed_call_runs_what_its_mode_times(mode):
    calls = []

    def attn(q, k, v):
        calls.append("forward")
        return sigmoid_attn_reference(q, k, v)

    inputs = bench.make_inputs("bshd", Shape(1, 2, 8, 4, False, "bf16"), device="cpu")
    step = bench.timed_call(attn, inputs, mode)
    built = len(calls)  # the backward mode runs its one forward while it is built, untimed
    step()
    assert (built, len(calls)) == {"fwd": (0, 1), "bwd": (1, 1), "fwd+bwd": (0, 1)}[mode]
    assert all((t.grad is None) == (mode == "fwd") for t in inputs)


def test_default_plan_is_the_full_sweep():
    plan = command.make_plan(parse())
    assert plan.shapes == bench.sweep_shapes((64, 128), (512, 1024, 2048, 4096, 8192, 16384), [True, False], "bf16")
    assert plan.modes == list(MODES) and plan.providers == list(bench.PROVIDERS) and plan.timing == bench.TIMING


def test_quick_plan():
    plan = command.make_plan(parse("--quick"))
    assert [(s.headdim, s.seqlen, s.causal) for s in plan.shapes] == [
        (128, 1024, True),
        (128, 4096, True),
        (128, 1024, False),
        (128, 4096, False),
    ]
    assert plan.timing == bench.QUICK_TIMING


def test_selection_options():
    shapes = ("--causal", "--headdim", "64", "--seqlen", "1k", "2048")
    args = parse(*shapes, "--providers", "sdpa-flash", "--modes", "bwd", "fwd", "--dtype", "fp16")
    plan = command.make_plan(args)
    assert plan.shapes == [Shape(16, 32, 1024, 64, True, "fp16"), Shape(8, 32, 2048, 64, True, "fp16")]
    assert plan.modes == ["bwd", "fwd"] and plan.providers == ["sdpa-flash"]
    assert {s.causal for s in command.make_plan(parse("--full")).shapes} == {False}
    assert {s.causal for s in command.make_plan(parse("--full", "--causal")).shapes} == {True, False}


def test_memory_plan():
    plan = command.make_plan(parse("--memory", "--providers", "sigattn"))
    assert plan.shapes == [Shape(1, 16, 65536, 128, True, "bf16"), Shape(1, 16, 65536, 128, False, "bf16")]
    assert plan.modes == [MEMORY_MODE] and plan.providers == ["sigattn"]
    with pytest.raises(ValueError, match="drop --seqlen, --modes"):
        command.make_plan(parse("--memory", "--seqlen", "1k", "--modes", "fwd"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--providers", "flash3"], "invalid choice: 'flash3'"),
        (["--seqlen", "4q"], "expected a length such as 512, 4096 or 4k, got '4q'"),
        (["--seqlen", "0"], "expected a positive length"),
        (["--modes", "backward"], "invalid choice: 'backward'"),
        (["--dtype", "fp32"], "invalid choice: 'fp32'"),
    ],
)
def test_bad_options_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_headdim_must_divide_the_hidden_size(capsys):
    assert cli.main(["bench", "--headdim", "96"]) == 2
    assert "--headdim must divide the hidden size 2048, got [96]" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_bench_without_cuda_exits_with_a_message(capsys):
    assert cli.main(["bench", "--quick"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("sigattn bench: error: the benchmark needs a CUDA GPU")


def test_sigattn_provider_is_skipped_without_a_triton_backend(monkeypatch):
    monkeypatch.delitem(bench.BACKENDS, "triton", raising=False)
    assert "no 'triton' backend is registered" in bench.PROVIDERS["sigattn"].missing()


# -------------------------------------------------------------------------- sweep, table, JSON, plot

FAKE_MS = {"sigattn": 1.0, "sdpa-flash": 2.0, "flex-sigmoid": 4.0}


def fake_providers() -> list[Provider]:
    """Providers whose "attention" returns their name, for fake_measure; flex-sigmoid cannot be built."""

    def build(name):
        def attention_for(shape):
            if name == "flex-sigmoid":
                raise NotImplementedError("no kernel for this shape\nsecond line of the error")
            return lambda: name

        return attention_for

    return [Provider(name, "bhsd", build(name), lambda: None) for name in FAKE_MS]


def fake_measure(attn, layout, shape, mode):
    """FAKE_MS per provider (twice that for fwd+bwd); sdpa-flash runs out of memory at seqlen 2048."""
    name = attn()
    if name == "sdpa-flash" and shape.seqlen == 2048:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
    return FAKE_MS[name] * (2 if mode == "fwd+bwd" else 1), 100.0


def cell(seqlen: int, mode: str, ms: float) -> str:
    """The table's TFLOP/s cell of the sweep fixture's shape at ``seqlen``."""
    shape = Shape(16384 // seqlen, 32, seqlen, 64, True, "bf16")
    return f"{bench.make_row('any', shape, mode, ms, 0.0)['tflops']:.1f}"


@pytest.fixture
def sweep():
    shapes = bench.sweep_shapes([64], [1024, 2048], [True], "bf16")
    lines = []
    rows, skips = bench.run_sweep(shapes, fake_providers(), ["fwd", "fwd+bwd"], fake_measure, lines.append)
    return rows, skips, lines


def test_sweep_records_failures_and_goes_on(sweep):
    rows, skips, progress = sweep
    measured = {(r["provider"], r["seqlen"], r["mode"]) for r in rows}
    assert measured == {("sigattn", s, m) for s in (1024, 2048) for m in ("fwd", "fwd+bwd")} | {
        ("sdpa-flash", 1024, "fwd"),
        ("sdpa-flash", 1024, "fwd+bwd"),
    }
    assert {(s.provider, s.shape.seqlen, s.mode) for s in skips} == {
        ("sdpa-flash", 2048, "fwd"),
        ("sdpa-flash", 2048, "fwd+bwd"),
        *(("flex-sigmoid", s, m) for s in (1024, 2048) for m in ("fwd", "fwd+bwd")),
    }
    assert {s.error for s in skips} == {
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB",
        "NotImplementedError: no kernel for this shape",
    }
    assert progress == [
        "headdim 64 causal seqlen 1024: 4 measured",
        "headdim 64 causal seqlen 2048: 2 measured",
    ]


def test_table_shows_tflops_ratios_and_skips(sweep):
    rows, skips, _ = sweep
    table = bench.format_table(rows, skips, list(FAKE_MS)).splitlines()
    assert table[0].split() == [
        "headdim",
        "mask",
        "seqlen",
        "mode",
        *FAKE_MS,
        "vs",
        "sdpa-flash",
        "vs",
        "flex-sigmoid",
    ]
    sigattn, flash = cell(1024, "fwd", 1.0), cell(1024, "fwd", 2.0)
    assert table[1].split() == ["64", "causal", "1024", "fwd", sigattn, flash, "skip[1]", "2.00x", "-"]
    assert table[4].split() == [
        "64",
        "causal",
        "2048",
        "fwd+bwd",
        cell(2048, "fwd+bwd", 2.0),
        "skip[2]",
        "skip[1]",
        "-",
        "-",
    ]
    assert table[-2:] == [
        "[1] NotImplementedError: no kernel for this shape",
        "[2] OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB",
    ]
    memory = bench.format_table(rows, skips, list(FAKE_MS), metric="peak_mem_mb", ratios=False).splitlines()
    assert "vs" not in memory[0] and memory[1].split()[4:6] == ["100.0", "100.0"]


def test_json_has_the_documented_schema(sweep, tmp_path):
    rows, _, _ = sweep
    path = tmp_path / "results" / "bench.json"
    write_json(path, run_meta(f"sigattn bench --quick --json {path}"), rows)
    data = json.loads(path.read_text())
    assert set(data) == {"meta", "rows"}
    meta = data["meta"]
    assert set(meta) == {"device", "torch", "triton", "python", "cuda", "date", "command", "git_commit"}
    assert meta["torch"] == torch.__version__ and meta["command"] == f"sigattn bench --quick --json {path}"
    assert data["rows"] == rows and all(set(r) == ROW_KEYS for r in rows)


def test_plot_draws_a_panel_per_headdim_mask_and_mode(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        bench.make_row(p, Shape(16384 // s, 2048 // d, s, d, c, "bf16"), m, ms, 1.0)
        for p, ms in (("sigattn", 1.0), ("sdpa-flash", 1.5))
        for d in (64, 128)
        for c in (True, False)
        for s in (512, 1024, 2048)
        for m in MODES
    ]
    path = tmp_path / "plot.png"
    fig = bench.plot(rows, path, title="synthetic")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 3 * 4
    titles = {ax.get_title() for ax in fig.axes}
    assert "headdim 128, full, fwd+bwd" in titles and "headdim 64, causal, bwd" in titles
    for ax in fig.axes:
        assert [line.get_label() for line in ax.get_lines()] == ["sigattn", "sdpa-flash"]
        assert [len(line.get_xdata()) for line in ax.get_lines()] == [3, 3]


# ---------------------------------------------------------------------------- FlexAttention formulation


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("seqlen", [37, 200])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flex_sigmoid_is_exactly_sigmoid_attention(causal, seqlen):
    """Eager FlexAttention (the CPU cannot compile it with return_lse) in float64 against the reference;
    seqlen 200 crosses FlexAttention's 128-wide mask blocks."""
    q, k, v = (torch.randn(2, 3, seqlen, 16, dtype=torch.float64) for _ in range(3))  # [B, H, S, D]
    attn = bench.flex_sigmoid_attention(seqlen, causal, "cpu", compiled=False)
    truth = sigmoid_attn_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    torch.testing.assert_close(attn(q, k, v), truth.transpose(1, 2), atol=1e-12, rtol=1e-12)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_sigmoid_uses_the_default_bias():
    """A wrong bias would change the output: the test above is not blind to it."""
    q, k, v = (torch.randn(1, 1, 37, 16, dtype=torch.float64) for _ in range(3))
    got = bench.flex_sigmoid_attention(37, False, "cpu", compiled=False)(q, k, v)
    other = sigmoid_attn_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias=-math.log(36))
    assert (got - other.transpose(1, 2)).abs().max() > 1e-4


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flex_sigmoid_compiled_with_gradients(causal):
    """The provider as benchmarked: compiled, bf16, forward and gradients within the tolerance rule."""
    b, h, s, d = 2, 4, 300, 64
    leaves = [torch.randn(b, s, h, d, device="cuda", dtype=torch.float64) for _ in range(3)]  # [B, S, H, D]
    dout = torch.randn(b, s, h, d, device="cuda", dtype=torch.float64)

    def forward_backward(fn, dtype):
        q, k, v = (t.to(dtype).requires_grad_() for t in leaves)
        out = fn(q, k, v)
        return [out, *torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))]

    flex = bench.flex_sigmoid_attention(s, causal, "cuda")
    ours = forward_backward(lambda *t: flex(*(x.transpose(1, 2) for x in t)).transpose(1, 2), torch.bfloat16)
    truth = forward_backward(lambda q, k, v: sigmoid_attn_reference(q, k, v, causal=causal), torch.float64)
    baseline = forward_backward(
        lambda q, k, v: sigmoid_attn_reference(q, k, v, causal=causal, upcast=False), torch.bfloat16
    )
    for name, got, exact, base in zip(("out", "dq", "dk", "dv"), ours, truth, baseline, strict=True):
        assert_within_tolerance_rule(name, got, exact, base, torch.bfloat16)


@pytest.mark.gpu
@needs_cuda
def test_bench_command_on_cuda(tmp_path, capsys):
    path = tmp_path / "bench.json"
    providers = ["--providers", "sdpa-flash", "flex-sigmoid"]
    argv = ["bench", *providers, "--headdim", "64", "--seqlen", "512", "--quick", "--json", str(path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 2 * 2 * 3, out  # 2 providers x causal/full x 3 modes
    for row in rows:
        assert row["ms"] > 0 and row["tflops"] > 0 and row["peak_mem_mb"] >= 0


def _saved_run(tmp_path, shapes) -> str:
    rows = [
        bench.make_row(p, shape, m, ms, 1.0)
        for p, ms in (("sigattn", 1.0), ("flex-softmax", 1.6))
        for shape in shapes
        for m in ("fwd", "bwd")
    ]
    meta = dict(device="synthetic GPU", torch="2.11", triton="3.6", date="2026-12-07")
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return str(path)


def test_replot_draws_a_saved_matrix_as_bars_and_a_sweep_as_lines(tmp_path, capsys):
    """``--replot JSON --plot PNG`` needs no GPU: a run whose rows have configurations becomes bars per
    (configuration, seqlen) and provider, a panel per mode; a plain sweep, the lines of ``plot``."""
    pytest.importorskip("matplotlib")
    windows = [Shape(1, 16, 16384, 128, True, "bf16", window=(w, 0)) for w in (256, 1024)]
    matrix = _saved_run(tmp_path, [*windows, Shape(1, 16, 16384, 128, True, "bf16", alibi=True)])
    png = tmp_path / "matrix.png"
    assert cli.main(["bench", "--replot", matrix, "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in capsys.readouterr().out
    fig = bench.plot_matrix(json.loads(Path(matrix).read_text())["rows"], tmp_path / "again.png")
    assert [ax.get_title() for ax in fig.axes] == ["fwd", "bwd"]
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["D128 causal window 256,0 16k", "D128 causal window 1024,0 16k", "D128 causal alibi 16k"]
    assert len(fig.axes[0].patches) == 3 * 2  # a bar per group and provider
    sweep = _saved_run(tmp_path, [Shape(16384 // s, 16, s, 128, True, "bf16") for s in (1024, 4096)])
    assert cli.main(["bench", "--replot", sweep, "--plot", str(tmp_path / "sweep.png")]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--replot", "run.json"], "--replot needs --plot PATH"),
        (["--replot", "run.json", "--plot", "x.png", "--matrix"], "measures nothing: drop --matrix"),
        (["--replot", "run.json", "--plot", "x.png", "--json", "y.json"], "measures nothing: drop --json"),
        (["--replot", "missing.json", "--plot", "x.png"], "--replot missing.json: FileNotFoundError"),
    ],
)
def test_replot_refuses_what_it_cannot_do(tmp_path, monkeypatch, capsys, argv, message):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------- --decode and --varlen


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--decode", "--varlen"], "choose one of --memory, --matrix, --decode and --varlen, got --decode --varlen"),
        (["--decode", "--seqlen", "1k"], "--decode runs its own fixed sweep (bf16): drop --seqlen"),
        (["--varlen", "--plot", "x.png"], "--varlen runs its own fixed sweep (bf16): drop --plot"),
        (["--varlen", "--modes", "fwd"], "drop --modes"),
    ],
)
def test_inference_sweeps_reject_the_dense_options(capsys, argv, message):
    assert cli.main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
@pytest.mark.parametrize("flag", ["--decode", "--varlen"])
def test_inference_sweeps_need_cuda(capsys, flag):
    assert cli.main(["bench", flag, "--quick"]) == 1
    assert "the benchmark needs a CUDA GPU" in capsys.readouterr().err


def test_decode_shapes_and_bytes():
    shapes = inf.decode_shapes(quick=False)
    assert len(shapes) == len(inf.DECODE_BATCHES) * len(inf.DECODE_CACHE_LENS) * len(inf.DECODE_HEADS)
    shape = inf.DecodeShape(2, 1024, 32, 8)
    assert shape.kv_bytes == 2 * 2 * 1024 * 8 * 128 * 2  # K and V, bf16
    assert {s.cache_len for s in inf.decode_shapes(quick=True)} == {4096, 32768}


@pytest.mark.parametrize("mixed", [False, True])
def test_varlen_lengths_cover_the_tokens(mixed):
    lengths = inf._lengths(1024, mixed)
    assert sum(lengths) == inf.VARLEN_TOKENS
    assert lengths == inf._lengths(1024, mixed)  # the same for every provider
    if mixed:
        assert len(set(lengths)) > 1 and max(lengths) <= 7 * 1024 // 4
    else:
        assert lengths == [1024] * 16


def test_decode_table_ratios():
    def row(provider, ms):
        return {
            "provider": provider,
            "heads": 32,
            "kv_heads": 8,
            "batch": 1,
            "cache_len": 8192,
            "ms": ms,
            "gbps": 1000 / ms,
            "gbps_eager": 100 / ms,
        }

    rows = [row("sigattn", 0.5), row("sdpa-flash", 1.0), row("sdpa-cudnn", 0.25), row("copy", 0.4)]
    skips = [("sdpa-math", inf.DecodeShape(1, 8192, 32, 8), "OutOfMemoryError: ...")]
    lines = inf.format_decode(rows, skips, copy=4000.0).splitlines()
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:7] == ["32/8", "1", "8k", "2000", "1000", "4000", "2500"]
    # of the 1 GiB copy, of the same-bytes copy; sdpa-flash takes 2x as long, cuDNN half; no ratio to the copy
    assert cells[7:11] == ["0.50", "0.80", "2.00x", "0.50x"]
    assert len(cells) == 13
    assert lines[-1] == "skipped sdpa-math: OutOfMemoryError: ..."


def test_varlen_table_ratios_from_graph_and_eager_times():
    def row(provider, tflops, tflops_eager):
        return {
            "provider": provider,
            "lengths": "equal",
            "seqlen": 512,
            "mode": "fwd",
            "tflops": tflops,
            "tflops_eager": tflops_eager,
        }

    rows = [row("sigattn-varlen", 300, 100), row("sigattn-dense", 320, 200), row("sigattn-loop", 10, 5)]
    line = inf.format_varlen(rows, []).splitlines()[2]
    assert line == "| equal | 512 | fwd | 300 | 320 | 10 | 0.94 | 30.00 | 0.50 | 20.00 |"
    # a step that could not be captured keeps its eager ratio; the skip says why
    rows[1]["tflops"] = None
    table = inf.format_varlen(rows, [("sigattn-dense", 512, "graph replay: RuntimeError")])
    assert table.splitlines()[2] == "| equal | 512 | fwd | 300 | - | 10 | - | 30.00 | 0.50 | 20.00 |"
    assert table.splitlines()[-1] == "skipped sigattn-dense at seqlen 512: graph replay: RuntimeError"


# ------------------------------------------------------------------------- the configuration matrix


@pytest.mark.parametrize("seqlen", [1, 7, 64])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window", [None, (0, 0), (3, 0), (5, 2), (-1, 4), (2, -1), (100, 100)])
def test_flops_count_the_pairs_a_window_allows(seqlen, causal, window):
    from sigattn.ops.sigmoid_attn.reference import Mask, allowed_keys

    mask = Mask(causal, window or (-1, -1))
    allowed = allowed_keys(seqlen, seqlen, torch.tensor([seqlen]), mask)
    pairs = int(allowed.expand(1, 1, seqlen, seqlen).sum())
    assert bench.unmasked_pairs(seqlen, causal, window) == pairs
    shape = Shape(2, 3, seqlen, 8, causal, "bf16", window=window, headdim_v=4)
    assert attention_flops(shape, "fwd") == 2 * 2 * 3 * pairs * (8 + 4)


def test_matrix_plan():
    plan = command.make_plan(parse("--matrix"))
    configs = {(s.seqlen, s.config or "plain") for s in plan.shapes}
    assert (16384, "window 4096,0") in configs
    assert (4096, "window 4096,0") not in configs and (1024, "window 256,0") in configs  # shorter than S only
    assert {c for _, c in configs} == {
        *(f"window {w},0" for w in (256, 1024, 4096)),
        *("alibi", "head_bias", "deterministic", "dropout 0.1", "plain", "dv 128", "gqa 32/8"),
    }
    assert {s.headdim for s in plan.shapes if not s.config} == {32, 64, 96, 128, 192, 256}
    for s in plan.shapes:
        assert s.batch * s.seqlen == 16384 and s.heads == 2048 // s.headdim
    gqa = [s for s in plan.shapes if s.hkv != s.heads]
    assert {(s.heads, s.hkv, s.headdim, s.causal) for s in gqa} == {(32, 8, 64, True), (32, 8, 64, False)}
    quick = command.make_plan(parse("--matrix", "--quick", "--config", "window|gqa"))
    assert {s.seqlen for s in quick.shapes} == {4096} and quick.timing == bench.QUICK_TIMING
    assert {s.config for s in quick.shapes} == {"window 256,0", "window 1024,0", "gqa 32/8"}
    assert {s.config for s in command.make_plan(parse("--matrix", "--config", "^plain$")).shapes} == {""}


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--matrix", "--headdim", "64"), "--matrix fixes head dims"),
        (("--matrix", "--causal"), "drop --causal"),
        (("--config", "window"), "add --matrix"),
        (("--matrix", "--config", "("), "must be a regular expression"),
        (("--matrix", "--config", "nothing-like-this"), "matches no configuration"),
        (("--matrix", "--memory"), "choose one of --memory and --matrix"),
    ],
)
def test_matrix_options_that_conflict(argv, message):
    with pytest.raises(ValueError, match=message):
        command.make_plan(parse(*argv))


def test_providers_decline_what_they_do_not_compute():
    def declines(provider, **options):
        return bench.PROVIDERS[provider].declines(Shape(1, 16, 4096, 128, True, "bf16", **options))

    assert declines("sigattn") is None and declines("sigattn", window=(256, 0), alibi=True) is None
    assert declines("sigattn", dropout=0.1) is None and declines("sigattn", headdim_v=64) is None
    for sdpa in ("sdpa-flash", "sdpa-cudnn"):
        assert declines(sdpa) is None and declines(sdpa, kv_heads=4) is None and declines(sdpa, dropout=0.1) is None
        assert "sliding window" in declines(sdpa, window=(256, 0))
        assert "bias" in declines(sdpa, alibi=True) and "bias" in declines(sdpa, head_bias=True)
        assert "deterministic" in declines(sdpa, deterministic=True)
    assert declines("flex-softmax", window=(256, 0)) is None and "dropout" in declines("flex-softmax", dropout=0.1)
    for plain in ("flex-sigmoid", "triton-sigmoid"):
        assert declines(plain) is None and "full or causal" in declines(plain, kv_heads=4)


def test_declined_shapes_are_skips_with_the_reason():
    shape = Shape(1, 16, 4096, 128, True, "bf16", dropout=0.1, headdim_v=64)
    built = []
    providers = [
        bench.PROVIDERS["flex-softmax"].__class__(
            "flex-softmax", "bhsd", built.append, lambda: None, bench.PROVIDERS["flex-softmax"].declines
        )
    ]
    rows, skips = bench.run_sweep([shape], providers, ["fwd", "bwd"], fake_measure)
    assert rows == [] and built == []
    assert [(s.mode, s.error) for s in skips] == [
        (m, f"not measured: {bench.PROVIDERS['flex-softmax'].declines(shape)}") for m in ("fwd", "bwd")
    ]
    assert "dropout" in skips[0].error
    table = bench.format_table(rows, skips, ["flex-softmax"]).splitlines()
    assert table[0].split()[:4] == ["headdim", "mask", "config", "seqlen"]
    assert table[1].split()[:7] == ["128", "causal", "dropout", "0.1", "dv", "64", "4096"]
    assert bench.PROVIDERS["sigattn"].declines(shape) is None  # sigattn serves every shape of the matrix


def test_sigattn_provider_passes_the_configuration(monkeypatch):
    seen = {}
    monkeypatch.setattr(
        bench, "sigmoid_attn_func", lambda q, k, v, dropout_p, **options: seen.update(options, dropout_p=dropout_p)
    )
    shape = Shape(1, 4, 64, 32, True, "bf16", window=(16, 0), alibi=True, head_bias=True, deterministic=True)
    bench._sigattn(shape, device="cpu")(None, None, None)
    assert seen["dropout_p"] == 0.0
    bench._sigattn(dataclasses.replace(shape, dropout=0.1), device="cpu")(None, None, None)
    assert seen["dropout_p"] == 0.1 and seen["causal"] is True and seen["window_size"] == (16, 0)
    assert seen["deterministic"] is True
    assert torch.allclose(seen["alibi_slopes"], torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))
    assert seen["bias"].shape == (4,) and seen["bias"].requires_grad


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_inputs_of_gqa_and_a_value_head_dim(layout):
    q, k, v = bench.make_inputs(layout, Shape(2, 8, 5, 16, True, "bf16", headdim_v=4, kv_heads=2), device="cpu")
    shapes = [(2, 5, 8, 16), (2, 5, 2, 16), (2, 5, 2, 4)]
    if layout == "bhsd":
        shapes = [(b, h, s, d) for b, s, h, d in shapes]
    assert [tuple(t.shape) for t in (q, k, v)] == shapes
    out = torch.randn(*q.shape[:-1], v.shape[-1])
    step = bench.timed_call(lambda q, k, v: out.requires_grad_() * 1, [q, k, v], "bwd")
    step()  # the output gradient has the output's shape (value head dim)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal, window", [(True, (5, 0)), (False, (3, 2)), (False, None), (True, None)])
def test_flex_softmax_is_softmax_with_the_mask(causal, window):
    from sigattn.ops.sigmoid_attn.reference import Mask, allowed_keys

    seqlen = 37
    shape = Shape(2, 4, seqlen, 16, causal, "bf16", window=window, kv_heads=2)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, seqlen, 16, generator=gen)
    k, v = (torch.randn(2, 2, seqlen, 16, generator=gen) for _ in "kv")
    got = bench.flex_softmax_attention(shape, device="cpu", compiled=False)(q, k, v)
    mask = allowed_keys(seqlen, seqlen, torch.tensor([seqlen]), Mask(causal, window or (-1, -1)))[0, 0]
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) / 4.0
    expected = scores.masked_fill(~mask, -math.inf).softmax(-1) @ v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
