"""sigattn.experiments: the statistics (t quantiles, slope fits), the MoE model, its least-squares fit and
Voronoi loss, the Lipschitz power iteration, the k-sum data, the verdict rules, and every experiment's
smallest setting end to end (result.json, report.md, PNG) through ``run`` and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

import sigattn
from sigattn import cli
from sigattn.experiments import EXPERIMENTS, common, index, ksum, lm, moe_rates, regularity
from sigattn.experiments import run as run_experiment

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# torch's forward-mode autograd (torch.func.jvp, used by the Lipschitz power iteration) scripts its own
# decompositions on first use, which warns in torch 2.13; not our code.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

# ------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize(
    "p, df, expected",
    [
        (0.975, 1, 12.7062),
        (0.975, 5, 2.5706),
        (0.975, 10, 2.2281),
        (0.975, 30, 2.0423),
        (0.95, 4, 2.1318),
        (0.975, 1e7, 1.9600),
        (0.025, 10, -2.2281),
    ],
)
def test_student_t_quantile_matches_tables(p, df, expected):
    assert common.student_t_quantile(p, df) == pytest.approx(expected, abs=2e-4)


def test_fit_power_law_recovers_a_known_slope_with_95_percent_coverage():
    """On 200 noisy power laws y = 3 n^(-1/2) e^noise the slope is right on average and the 95% CI holds
    -1/2 about 95% of the time (a binomial 99.9% range for 200 trials is about 0.90-0.99)."""
    generator = torch.Generator().manual_seed(0)
    ns = [100, 200, 400, 800, 1600, 3200] * 5
    slopes, covered = [], 0
    for _ in range(200):
        noise = torch.randn(len(ns), generator=generator, dtype=torch.float64) * 0.3
        fit = common.fit_power_law(ns, [3.0 * n**-0.5 * math.exp(e) for n, e in zip(ns, noise.tolist(), strict=True)])
        slopes.append(fit.slope)
        covered += fit.ci95[0] < -0.5 < fit.ci95[1]
        assert fit.points == len(ns)
    assert sum(slopes) / len(slopes) == pytest.approx(-0.5, abs=0.01)
    assert 0.90 <= covered / 200 <= 0.99


def test_fit_line_exact_data_and_bad_input():
    fit = common.fit_line([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 5.0, 7.0])
    assert fit.slope == pytest.approx(2.0) and fit.intercept == pytest.approx(-1.0)
    assert fit.ci95[0] == pytest.approx(2.0) and fit.ci95[1] == pytest.approx(2.0)
    with pytest.raises(ValueError, match=">= 3 points"):
        common.fit_line([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        common.fit_power_law([1.0, 2.0, 3.0], [1.0, 0.0, 2.0])


# ----------------------------------------------------------------------------------------- moe-rates


def truth(regime: str = "dense") -> torch.Tensor:
    return moe_rates.pack(*moe_rates.TRUTH[regime].tensors())  # [k*, p]


def exact_representations(kind: str) -> torch.Tensor:
    """Two three-atom parameter sets (2, 3, p) that give exactly the true function (the loss must be 0):
    sigmoid: an extra atom with a zero value (any gate), and atom 0 split into two with the same gate and
    values adding up; softmax: atom 0's mass split in two with equal values, and split with the extra
    atom's value zero and atom 0's value scaled up to keep the contribution."""
    atoms = truth()
    q = moe_rates.DIM * (moe_rates.DIM + 1) // 2
    first, second = atoms[0].clone(), atoms[0].clone()
    if kind == "sigmoid":
        silent = torch.tensor([1.0, -2.0, 0.5, -3.0, 0.0, 0.0], dtype=torch.float64)
        first[q + 1 :] *= 0.3
        second[q + 1 :] *= 0.7
        return torch.stack([torch.stack([atoms[0], atoms[1], silent]), torch.stack([first, atoms[1], second])])
    first[q] -= math.log(2)
    second[q] -= math.log(2)
    scaled, silent = atoms[0].clone(), atoms[0].clone()
    scaled[q] += math.log(0.25)
    scaled[q + 1 :] /= 0.25
    silent[q] += math.log(0.75)
    silent[q + 1 :] = 0.0
    return torch.stack([torch.stack([first, atoms[1], second]), torch.stack([scaled, atoms[1], silent])])


@pytest.mark.parametrize("kind", moe_rates.KINDS)
def test_moe_jacobian_matches_autograd(kind):
    generator = torch.Generator().manual_seed(0)
    theta = truth()[None] + 0.1 * torch.randn(1, 2, 6, generator=generator, dtype=torch.float64)
    x = torch.rand(1, 5, 2, generator=generator, dtype=torch.float64) * 2 - 1
    _, jac = moe_rates.moe_forward(theta, x, kind, jacobian=True)
    expected = torch.autograd.functional.jacobian(lambda t: moe_rates.moe_forward(t, x, kind), theta)
    torch.testing.assert_close(jac[0], expected[0, :, 0].flatten(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", moe_rates.KINDS)
def test_voronoi_loss_zero_at_truth_and_grows_with_perturbation(kind):
    exact = exact_representations(kind)
    x = torch.rand(2, 50, 2, dtype=torch.float64) * 2 - 1
    clean = moe_rates.moe_forward(truth().expand(2, -1, -1), x, kind)
    torch.testing.assert_close(moe_rates.moe_forward(exact, x, kind), clean)  # the same function...
    assert moe_rates.voronoi_loss(exact, truth(), kind).abs().max() < 1e-12  # ...and a zero loss
    direction = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    losses = [moe_rates.voronoi_loss(exact + t * direction, truth(), kind) for t in (1e-3, 1e-2, 1e-1, 1.0)]
    for smaller, larger in zip(losses, losses[1:], strict=False):
        assert bool((larger > smaller).all()), (smaller, larger)
    assert bool((losses[0] > 0).all())


@pytest.mark.parametrize("kind", moe_rates.KINDS)
def test_least_squares_recovers_noiseless_truth(kind):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 400, 2, generator=generator, dtype=torch.float64) * 2 - 1
    y = moe_rates.moe_forward(truth().expand(2, -1, -1), x, kind)
    start = moe_rates.project(truth()[None] + 0.2 * torch.randn(2, 2, 6, generator=generator, dtype=torch.float64))
    theta, error, _ = moe_rates.least_squares(start, x, y, kind, iterations=60)
    assert float(error.max()) < 1e-12
    assert float(moe_rates.voronoi_loss(theta, truth(), kind).max()) < 1e-4


def moe_results(sig_ci, soft_ci) -> dict:
    def entry(ci):
        return {"slope": sum(ci) / 2, "ci95": list(ci)}

    return {regime: {"sigmoid": entry(sig_ci), "softmax": entry(soft_ci)} for regime in moe_rates.REGIMES}


def test_moe_verdict_rule():
    assert moe_rates.decide(moe_results((-0.55, -0.45), (-0.3, -0.1))).supports is True
    assert moe_rates.decide(moe_results((-0.55, -0.45), (-0.5, -0.1))).supports is False  # CIs overlap
    assert moe_rates.decide(moe_results((-0.9, -0.7), (-0.3, -0.1))).supports is False  # not near -1/2


# ---------------------------------------------------------------------------------------- regularity


def test_power_iteration_matches_exact_singular_value_of_a_linear_map():
    matrix = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma, _ = regularity.top_singular_value(lambda x: matrix @ x, torch.randn(6, dtype=torch.float64), 200)
    assert sigma == pytest.approx(torch.linalg.matrix_norm(matrix, ord=2).item(), rel=1e-8)


@pytest.mark.parametrize("kind", regularity.KINDS)
def test_power_iteration_matches_exact_jacobian_norm_of_attention(kind):
    generator = torch.Generator().manual_seed(0)
    weights = regularity.make_weights(3, generator)
    x = regularity.on_spheres(torch.randn(4, 3, generator=generator, dtype=torch.float64), 2.0)

    def layer(y):
        return regularity.attention_layer(y, weights, kind)

    jac = torch.autograd.functional.jacobian(layer, x).reshape(12, 12)
    sigma, _ = regularity.top_singular_value(layer, x, 300)
    assert sigma == pytest.approx(torch.linalg.matrix_norm(jac, ord=2).item(), rel=1e-6)


def test_sigmoid_attention_layer_is_sigattns():
    generator = torch.Generator().manual_seed(0)
    weights = regularity.make_weights(8, generator)
    x = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    q, k, v = (x @ w for w in weights)
    expected = sigattn.sigmoid_attn_func(
        q[None, :, None], k[None, :, None], v[None, :, None], bias=-math.log(5), scale=1 / math.sqrt(8)
    )[0, :, 0]
    torch.testing.assert_close(regularity.attention_layer(x, weights, "sigmoid"), expected)


def test_growth_fits_tell_polynomial_from_exponential():
    radii = [1.0, 2.0, 4.0, 8.0, 16.0]
    assert regularity.growth_fits(radii, [r**2 for r in radii], 1.0)["growth"] == "polynomial"
    assert regularity.growth_fits(radii, [math.exp(0.5 * r) for r in radii], 1.0)["growth"] == "exponential"


# -------------------------------------------------------------------------------------------- ksum


def test_ksum_batch_targets_are_the_sums_of_the_matching_values():
    settings = ksum.SETTINGS["quick"]
    k = torch.tensor([1, 3, 8, 16, 5, 2])
    batch = ksum.ksum_batch(6, settings, k, torch.Generator().manual_seed(0))
    context_keys, query_key = batch.keys[:, :-1], batch.keys[:, -1:]
    match = context_keys == query_key
    assert match.sum(1).tolist() == k.tolist()
    assert batch.target.tolist() == (batch.values[:, :-1] * match).sum(1).tolist()
    assert bool((batch.values[:, -1] == settings.num_values).all())
    assert batch.roles[:, -1].tolist() == [ksum.QUERY] * 6 and bool((batch.roles[:, :-1] == ksum.CONTEXT).all())
    assert bool((batch.values[:, :-1] < settings.num_values).all())
    with pytest.raises(ValueError, match="k must be in"):
        ksum.ksum_batch(2, settings, settings.seqlen + 1, torch.Generator().manual_seed(0))


def test_ksum_verdict_rule():
    settings = ksum.SETTINGS["quick"]  # k_max 8, 400 sums per k
    softmax = [0.5] * 8
    growing = [0.5 + 0.04 * k for k in range(8)]
    assert ksum.decide({"sigmoid": growing, "softmax": softmax}, settings).supports is True
    constant = [0.8] * 8  # ahead at every k, but the gap does not grow
    assert ksum.decide({"sigmoid": constant, "softmax": softmax}, settings).supports is False
    assert ksum.decide({"sigmoid": softmax, "softmax": growing}, settings).supports is False


def test_synthetic_text_is_deterministic():
    text = lm.synthetic_text(2000, seed=3)
    assert text == lm.synthetic_text(2000, seed=3) and text != lm.synthetic_text(2000, seed=4)
    assert len(text) >= 2000 and text.endswith(".\n")


# ------------------------------------------------------------------------------------ whole experiments


def check_outputs(out, name: str) -> dict:
    result = json.loads((out / "result.json").read_text())
    assert result["experiment"] == name
    verdict = result["verdict"]
    assert verdict["supports"] in (True, False, None) and verdict["rule"] and verdict["summary"]
    assert result["meta"]["size"] == "test" and result["meta"]["seconds"] >= 0
    report = (out / "report.md").read_text()
    assert f"**Verdict: {verdict['word']} the claim.**" in report and verdict["summary"] in report
    assert result["figures"]
    for figure in result["figures"]:
        assert (out / figure).read_bytes()[:8] == PNG_MAGIC
        assert f"]({figure})" in report
    return result


def test_moe_rates_end_to_end(tmp_path):
    run_experiment("moe-rates", tmp_path, size="test", log=lambda line: None)
    result = check_outputs(tmp_path, "moe-rates")
    for regime in ("dense", "sparse"):
        for kind in ("sigmoid", "softmax"):
            entry = result[regime][kind]
            assert entry["ci95"][0] <= entry["slope"] <= entry["ci95"][1]
            assert len(entry["per_n"]) == len(moe_rates.SETTINGS["test"].sample_sizes)


@pytest.mark.parametrize("name", ["bias-ablation", "length-extrapolation", "ksum"])
def test_experiment_end_to_end(tmp_path, name):
    run_experiment(name, tmp_path, size="test", log=lambda line: None)
    result = check_outputs(tmp_path, name)
    if name == "bias-ablation":
        assert set(result["init_norms"]) == {"b=0", "b=-log n", "softmax"}
        assert len(result["runs"]) == 10
        assert not list(tmp_path.glob("runs/*/checkpoint.pt"))
    elif name == "length-extrapolation":
        assert set(result["loss_ratio_8x"]) == {"rope", "alibi"}
    else:
        assert len(result["accuracy"]["sigmoid"]) == ksum.SETTINGS["test"].k_max


def test_cli_experiment_writes_the_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(regularity.SETTINGS, "quick", regularity.SETTINGS["test"])
    assert cli.main(["experiment", "regularity", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["meta"]["command"] == f"sigattn experiment regularity --quick --out {tmp_path}"
    assert set(result["sigmoid"]) == {"lipschitz", "fit"}
    assert "regularity:" in capsys.readouterr().out


def test_results_index_lists_verdicts_plots_and_missing_runs(tmp_path):
    run_experiment("ksum", tmp_path / "ksum", size="test", log=lambda line: None)
    text = index.write_index(tmp_path, EXPERIMENTS).read_text()
    verdict = json.loads((tmp_path / "ksum" / "result.json").read_text())["verdict"]
    assert f"**{verdict['word'].capitalize()} the claim:** {verdict['summary']}" in text
    assert "![ksum](ksum/ksum.png)" in text
    assert "Not run here. Run it with `sigattn experiment moe-rates`" in text


def test_unknown_experiment_and_size():
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiment("nope", "unused")
    with pytest.raises(ValueError, match="size must be one of"):
        run_experiment("ksum", "unused", size="huge")
    assert set(EXPERIMENTS) == {"moe-rates", "bias-ablation", "regularity", "length-extrapolation", "ksum"}
