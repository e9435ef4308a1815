"""sigattn.experiments: the statistics (t quantiles, slope fits, intervals and power over seeds, the rule that
judges a claim over seeds), the MoE model, its least-squares fit and Voronoi loss, the Lipschitz power
iteration, the k-sum data, the verdict rules, and every experiment's smallest setting end to end (result.json,
report.md, PNG) through ``run`` and the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

import sigattn
from sigattn import cli, stats
from sigattn.experiments import (
    EXPERIMENTS,
    bias_ablation,
    common,
    index,
    ksum,
    length_extrapolation,
    lm,
    moe_rates,
    regularity,
)
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
    assert stats.student_t_quantile(p, df) == pytest.approx(expected, abs=2e-4)


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


# ------------------------------------------------------------------------------------------- over seeds


def test_summarize_seeds_matches_a_hand_computation():
    """[1, 2, 3, 4, 5]: mean 3, SD √2.5, t(0.975, 4) = 2.776445 (tables), half-width 2.776445·√2.5/√5 = 1.963243;
    detectable difference (2.776445 + t(0.80, 4) = 0.940965)·√2.5/√5 = 2.628630."""
    summary = stats.summarize_seeds([1, 2, 3, 4, 5])
    assert summary.mean == pytest.approx(3.0) and summary.sd == pytest.approx(math.sqrt(2.5))
    assert summary.ci95[0] == pytest.approx(3 - 1.963243, abs=1e-4)
    assert summary.ci95[1] == pytest.approx(3 + 1.963243, abs=1e-4)
    assert summary.detectable == pytest.approx(2.628630, abs=1e-4)
    assert summary.seeds == 5 and summary.to_dict()["values"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    one = stats.summarize_seeds([0.7])
    assert one.mean == 0.7 and one.ci95 is None and one.detectable is None
    with pytest.raises(ValueError, match="at least one value"):
        stats.summarize_seeds([])
    diverged = stats.summarize_seeds([1.5, math.nan, 1.6])  # a seed whose loss went nan: nan, not a traceback
    assert math.isnan(diverged.mean) and math.isnan(diverged.sd) and all(map(math.isnan, diverged.ci95))
    assert math.isnan(stats.summarize_seeds([math.inf, 2.0]).detectable)


@pytest.mark.parametrize("values", [[0.12, -0.3, 0.05, 0.4, 0.22], [3.0, 3.5, 2.0, 4.1, 3.3, 2.9, 3.8, 3.0]])
def test_summarize_seeds_matches_scipy(values):
    scipy_stats = pytest.importorskip("scipy.stats")
    summary = stats.summarize_seeds(values)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=summary.mean, scale=scipy_stats.sem(values))
    assert summary.ci95 == pytest.approx((low, high), abs=1e-5)


def test_detectable_difference_grows_with_spread_and_power_and_shrinks_with_seeds():
    by_seeds = [stats.detectable_difference(1.0, n) for n in (2, 3, 5, 8, 20, 100)]
    assert all(a > b for a, b in zip(by_seeds, by_seeds[1:], strict=False))
    assert stats.detectable_difference(2.0, 5) == pytest.approx(2 * stats.detectable_difference(1.0, 5))
    by_power = [stats.detectable_difference(1.0, 8, power=p) for p in (0.5, 0.8, 0.9, 0.99)]
    assert all(a < b for a, b in zip(by_power, by_power[1:], strict=False))
    assert stats.detectable_difference(1.0, 8, alpha=0.01) > stats.detectable_difference(1.0, 8)
    # many seeds: the normal approximation (1.96 + 0.8416) σ/√n
    assert stats.detectable_difference(1.0, 10**7) * math.sqrt(10**7) == pytest.approx(2.8016, abs=1e-3)
    with pytest.raises(ValueError, match=">= 2 seeds"):
        stats.detectable_difference(1.0, 1)


@pytest.mark.parametrize("seeds", [5, 8, 20])
def test_detectable_difference_has_about_80_percent_power(seeds):
    """The exact power (non-central t) of the two-sided test at the detectable difference is 0.79-0.80."""
    scipy_stats = pytest.importorskip("scipy.stats")
    delta = stats.detectable_difference(1.0, seeds)
    critical = scipy_stats.t.ppf(0.975, seeds - 1)
    shift = delta * math.sqrt(seeds)
    power = scipy_stats.nct.sf(critical, seeds - 1, shift) + scipy_stats.nct.cdf(-critical, seeds - 1, shift)
    assert 0.785 <= power <= 0.81


DIFFERENCE = common.Claim("slope difference", high=0.0, effect=0.1)  # the claim: below 0, by at least 0.1


@pytest.mark.parametrize(
    "values, supports, reason",
    [
        ([-0.52, -0.48, -0.55, -0.45, -0.5], True, "lies inside the claimed range (< 0)"),
        ([-0.02, -0.03, -0.01, -0.025, -0.015], True, "lies inside"),  # below 0, if by less than 0.1
        ([0.3, 0.25, 0.35, 0.28, 0.32], False, "lies entirely above 0: the other side"),
        ([-0.02, 0.01, 0.0, -0.01, 0.02], False, "excludes differences of the claimed size (0.1 beyond 0)"),
        ([-0.6, 0.4, -0.3, 0.5, 0.1], None, "straddles 0; the detectable difference is"),
        ([-0.05], None, "one seed"),
        ([-0.52, math.nan, -0.55], None, "a seed's value is not finite"),
    ],
    ids=[
        "clearly-supporting",
        "small-but-supporting",
        "clearly-refuting",
        "excludes-claimed-size",
        "straddling",
        "one-seed",
        "diverged-seed",
    ],
)
def test_judge_applies_the_rule_to_a_claimed_difference(values, supports, reason):
    judgement = common.judge(values, DIFFERENCE)
    assert judgement.supports is supports, judgement.reason
    assert reason in judgement.reason


def test_judge_reports_whether_the_claimed_effect_was_detectable():
    wide = common.judge([-0.6, 0.4, -0.3, 0.5, 0.1], DIFFERENCE)
    assert wide.summary.detectable > 0.1 and "larger than the claimed effect 0.1" in wide.reason
    assert "could not reliably have been detected" in common.power_sentence(wide)
    # straddles 0 yet reaches below -0.1: inconclusive, although a difference of 0.1 was within reach
    narrow = common.judge([-0.16, -0.1, -0.045, 0.015, 0.07, -0.08, -0.01, -0.05], DIFFERENCE)
    assert narrow.summary.detectable < 0.1 and narrow.supports is None
    assert "no larger than the claimed effect 0.1" in narrow.reason
    assert "could have been detected" in common.power_sentence(narrow)


@pytest.mark.parametrize(
    "values, supports",
    [([-0.5, -0.48, -0.52, -0.49], True), ([-0.9, -0.95, -0.85, -0.92], False), ([-0.3, -0.6, -0.45, -0.7], None)],
)
def test_judge_applies_the_rule_to_a_claimed_range(values, supports):
    near_half = common.Claim("slope", low=-0.6, high=-0.4)
    assert common.judge(values, near_half).supports is supports


def test_claims_must_make_sense_and_verdicts_combine():
    with pytest.raises(ValueError, match="low < high"):
        common.Claim("x", low=1.0, high=0.0)
    with pytest.raises(ValueError, match="one-sided"):
        common.Claim("x", low=-1.0, high=1.0, effect=0.1)
    yes, no, maybe = (
        common.judge(v, common.Claim("x", low=0.0)) for v in ([1, 1.1, 0.9], [-1, -1.1, -0.9], [-1, 1, 0])
    )
    assert (yes.supports, no.supports, maybe.supports) == (True, False, None)
    assert common.combine([yes, yes]) is True
    assert common.combine([yes, maybe]) is None
    assert common.combine([maybe, no, yes]) is False
    table = common.judgements_markdown([yes, maybe])
    assert "| x | > 0 | 1, 1.1, 0.9 |" in table and "supported" in table and "inconclusive" in table
    assert stats.POWER_FORMULA in table


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


def moe_verdict(sigmoid: list[float], softmax: list[float]) -> bool | None:
    slopes = {regime: {"sigmoid": sigmoid, "softmax": softmax} for regime in moe_rates.REGIMES}
    return moe_rates.decide(moe_rates.judgements(slopes)).supports


def test_moe_verdict_rule_over_seeds():
    near_half = [-0.5, -0.47, -0.52, -0.49, -0.51]
    assert moe_verdict(near_half, [-0.2, -0.25, -0.15, -0.22, -0.18]) is True  # faster and near -1/2
    assert moe_verdict(near_half, [-0.8, -0.85, -0.75, -0.82, -0.78]) is False  # softmax faster: the other side
    assert moe_verdict(near_half, [-0.5, -0.48, -0.52, -0.5, -0.49]) is False  # excludes a 0.1 difference
    assert moe_verdict(near_half, [-0.9, -0.1, -0.5, -0.2, -0.7]) is None  # the difference straddles 0
    assert moe_verdict([-0.9, -0.88, -0.92, -0.9, -0.91], [-0.2, -0.2, -0.3, -0.1, -0.2]) is False  # not near -1/2
    slopes = {regime: {"sigmoid": [-0.5, -0.4], "softmax": [-0.2, -0.3]} for regime in moe_rates.REGIMES}
    parts = moe_rates.judgements(slopes)
    assert parts[0].summary.values == pytest.approx([-0.3, -0.1])  # paired by seed


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
    polynomial = regularity.growth_fits(radii, [r**2 for r in radii], 1.0)
    exponential = regularity.growth_fits(radii, [math.exp(0.5 * r) for r in radii], 1.0)
    assert polynomial["growth"] == "polynomial" and regularity.rms_difference(polynomial) < 0
    assert exponential["growth"] == "exponential" and regularity.rms_difference(exponential) > 0


def test_regularity_verdict_rule_over_seeds():
    polynomial, exponential = [-0.3, -0.35, -0.28, -0.32, -0.31], [0.2, 0.25, 0.22, 0.18, 0.21]
    straddling = [-0.3, 0.2, -0.1, 0.15, 0.05]

    def verdict(sigmoid, softmax):
        return regularity.decide(regularity.judgements({"sigmoid": sigmoid, "softmax": softmax})).supports

    assert verdict(polynomial, exponential) is True
    assert verdict(polynomial, polynomial) is False  # softmax's interval lies on the polynomial side
    assert verdict(polynomial, straddling) is None


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


def ksum_verdict(sigmoid_slopes: list[float], offset: float = 0.3) -> bool | None:
    """Synthetic seeds: softmax at 0.5 for every k, sigmoid ahead by ``offset`` plus a gap with the given slope."""
    settings = ksum.SETTINGS["quick"]  # k_max 8: the claimed effect is 0.1 / 7 per unit of k
    ks = range(1, settings.k_max + 1)
    per_seed = {
        "sigmoid": [[0.5 + offset + slope * k for k in ks] for slope in sigmoid_slopes],
        "softmax": [[0.5] * settings.k_max for _ in sigmoid_slopes],
    }
    parts = ksum.judgements(per_seed, settings)
    assert parts[0].summary.values == pytest.approx(sigmoid_slopes)
    return ksum.decide(parts, settings).supports


def test_ksum_verdict_rule_over_seeds():
    assert ksum_verdict([0.04, 0.035, 0.045, 0.04, 0.038]) is True  # the gap grows with k
    assert ksum_verdict([-0.02, -0.025, -0.015, -0.02, -0.018]) is False  # it shrinks: the other side
    assert ksum_verdict([0.001, -0.001, 0.0, 0.002, -0.002]) is False  # ahead at every k, but no claimed growth
    assert ksum_verdict([0.03, -0.02, 0.01, -0.03, 0.02]) is None  # straddles 0


def test_synthetic_text_is_deterministic():
    text = lm.synthetic_text(2000, seed=3)
    assert text == lm.synthetic_text(2000, seed=3) and text != lm.synthetic_text(2000, seed=4)
    assert len(text) >= 2000 and text.endswith(".\n")


def test_train_run_keeps_finished_runs_and_replaces_the_rest(tmp_path):
    """A finished run is taken back from its folder (an experiment stopped by a time limit resumes there); an
    unfinished one, or one of another configuration, is trained again from scratch."""
    data, _ = lm.corpus_data("synthetic", tmp_path, 20_000)
    model = bias_ablation.model_config(
        bias_ablation.SETTINGS["test"], "sigmoid", bias_ablation.BIASES["b=0"], bias_ablation.STABILISERS["plain"]
    )
    recipe = lm.TrainRecipe(3, 4, 3e-3, 1, 2, device="cpu")
    config, folder = lm.run_config(model, data, recipe), tmp_path / "run"
    first = lm.train_run(config, folder)
    record = json.loads((folder / "run.json").read_text())
    assert record["run"] == json.loads(json.dumps(first))
    stamp = (folder / "metrics.jsonl").stat().st_mtime_ns
    assert lm.train_run(config, folder) == record["run"]
    assert (folder / "metrics.jsonl").stat().st_mtime_ns == stamp  # not trained again
    other = lm.run_config(model, data, replace(recipe, seed=1))
    second = lm.train_run(other, folder)
    assert second["train_loss"] != first["train_loss"]
    assert json.loads((folder / "run.json").read_text())["config"]["train"]["seed"] == 1
    (folder / "run.json").unlink()  # a run stopped before its end: trained again
    (folder / "leftover").write_text("x")
    assert lm.train_run(other, folder)["train_loss"] == second["train_loss"]
    assert not (folder / "leftover").exists()


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


def check_judgements(result: dict, seeds: int) -> None:
    """Every judged statistic carries its per-seed values, an interval around the mean and a power statement."""
    assert result["judgements"]
    for entry in result["judgements"]:
        assert len(entry["values"]) == seeds == entry["seeds"]
        assert entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1] and entry["detectable"] >= 0
        assert entry["supports"] in (True, False, None) and entry["reason"]


def test_moe_rates_end_to_end(tmp_path):
    run_experiment("moe-rates", tmp_path, size="test", log=lambda line: None)
    result = check_outputs(tmp_path, "moe-rates")
    settings = moe_rates.SETTINGS["test"]
    check_judgements(result, len(settings.seeds))
    for regime in ("dense", "sparse"):
        for kind in ("sigmoid", "softmax"):
            entry = result[regime][kind]
            assert entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]
            assert len(entry["per_n"]) == len(settings.sample_sizes)
            assert [seed["seed"] for seed in entry["per_seed"]] == list(settings.seeds)
            assert entry["values"] == [seed["slope"] for seed in entry["per_seed"]]
        sigmoid, softmax = result[regime]["sigmoid"]["values"], result[regime]["softmax"]["values"]
        difference = [a - b for a, b in zip(sigmoid, softmax, strict=True)]
        assert result[regime]["difference"]["values"] == pytest.approx(difference)


@pytest.mark.parametrize("name", ["bias-ablation", "length-extrapolation", "ksum"])
def test_experiment_end_to_end(tmp_path, name):
    run_experiment(name, tmp_path, size="test", log=lambda line: None)
    result = check_outputs(tmp_path, name)
    if name == "bias-ablation":
        assert set(result["init_norms"]) == {"b=0", "b=-log n", "softmax"}
        seeds = bias_ablation.SETTINGS["test"].seeds
        assert len(result["runs"]) == 10 and len(seeds) == 2
        for variant, summary in result["runs"].items():  # over the seeds: spikes summed, losses averaged
            per_seed = summary["per_seed"]
            assert [entry["seed"] for entry in per_seed] == list(seeds)
            assert summary["grad_spikes"] == sum(entry["grad_spikes"] for entry in per_seed)
            assert summary["final_train_loss"] == pytest.approx(sum(e["final_train_loss"] for e in per_seed) / 2)
            assert summary["max_grad_norm"] == max(entry["max_grad_norm"] for entry in per_seed)
            folder = variant.replace(" / ", "_").replace(" ", "").replace("=", "")
            for seed in seeds:  # each seed trained from its own initialisation
                assert json.loads((tmp_path / "runs" / f"{folder}_seed{seed}" / "config.json").read_text())
            assert per_seed[0]["final_train_loss"] != per_seed[1]["final_train_loss"]
        assert "over 2 seeds (spikes summed, losses averaged)" in result["verdict"]["rule"]
        assert "| train loss per seed | spikes per seed |" in (tmp_path / "report.md").read_text()
        assert not list(tmp_path.glob("runs/*/checkpoint.pt"))
    elif name == "length-extrapolation":
        seeds = len(length_extrapolation.SETTINGS["test"].seeds)
        assert set(result["loss_ratio_8x"]) == {"rope", "alibi"} and seeds == 2
        check_judgements(result, seeds)
        assert len(result["judgements"]) == 4  # sigmoid vs softmax per position, ALiBi vs RoPE per attention
        for pos, kinds in result["loss_ratio_8x"].items():
            for kind, ratios in kinds.items():
                runs = result["val_loss_by_context_per_seed"][pos][kind]
                length = str(result["train_length"])
                assert ratios == pytest.approx([r[str(8 * int(length))] / r[length] for r in runs])
                assert len({json.dumps(r) for r in runs}) == seeds  # each seed trained its own model
    else:
        settings = ksum.SETTINGS["test"]
        assert len(result["accuracy"]["sigmoid"]) == settings.k_max
        assert len(result["accuracy_per_seed"]["softmax"]) == len(settings.seeds)
        check_judgements(result, len(settings.seeds))


def test_cli_experiment_writes_the_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(regularity.SETTINGS, "quick", regularity.SETTINGS["test"])
    assert cli.main(["experiment", "regularity", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["meta"]["command"] == f"sigattn experiment regularity --quick --out {tmp_path}"
    assert set(result["sigmoid"]) == {"lipschitz", "rms_difference", "exponent", "rate", "per_seed"}
    check_judgements(result, len(regularity.SETTINGS["test"].seeds))
    assert "Detectable difference (80% power" in (tmp_path / "report.md").read_text()
    assert "regularity:" in capsys.readouterr().out


def test_results_index_lists_verdicts_plots_and_missing_runs(tmp_path):
    run_experiment("ksum", tmp_path / "ksum", size="test", log=lambda line: None)
    text = index.write_index(tmp_path, EXPERIMENTS).read_text()
    verdict = json.loads((tmp_path / "ksum" / "result.json").read_text())["verdict"]
    assert f"**{verdict['word'].capitalize()} the claim:** {verdict['summary']}" in text
    assert "![ksum](ksum/ksum.png)" in text
    assert "Not run here. Run it with `sigattn experiment moe-rates`" in text
    seeds = len(ksum.SETTINGS["test"].seeds)
    assert f"| **{verdict['word']}** | {seeds} | test |" in text and f"Size `test`, {seeds} seeds" in text
    assert "still one-seed results" not in text  # no one-seed experiment has run here


def test_results_index_marks_one_seed_results(tmp_path):
    """An experiment whose settings name no seeds (the committed one-seed results) is listed as one seed."""
    folder = tmp_path / "bias-ablation"
    folder.mkdir()
    verdict = {"word": "supports", "summary": "s"}
    meta = {"size": "full", "seconds": 1.0, "date": "d", "command": "c"}
    (folder / "result.json").write_text(json.dumps({"verdict": verdict, "settings": {}, "figures": [], "meta": meta}))
    text = index.index_markdown(tmp_path, EXPERIMENTS)
    assert "| **supports** | 1 | full |" in text
    assert "bias-ablation: still one-seed results" in text


def test_unknown_experiment_and_size(tmp_path):
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiment("nope", "unused")
    with pytest.raises(ValueError, match="size must be one of"):
        run_experiment("ksum", "unused", size="huge")
    with pytest.raises(ValueError, match="experiment 'ksum' has no size 'gpu'; its sizes: 'test', 'quick', 'full'"):
        run_experiment("ksum", tmp_path / "ksum", size="gpu")
    with pytest.raises(ValueError, match="quick=True asks for size 'quick', but size='test' was given"):
        run_experiment("ksum", tmp_path / "ksum", quick=True, size="test")
    assert not list(tmp_path.iterdir())  # refused before anything was written
    assert set(EXPERIMENTS) == {"moe-rates", "bias-ablation", "regularity", "length-extrapolation", "ksum"}


def test_cli_experiment_size(tmp_path, capsys):
    """--size picks the setting; an experiment without it is refused by name, --quick with --size by argparse."""
    assert cli.main(["experiment", "ksum", "--size", "gpu", "--out", str(tmp_path / "k")]) == 2
    assert "--size: experiment 'ksum' has no size 'gpu'; its sizes: 'test', 'quick', 'full'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["experiment", "ksum", "--quick", "--size", "test"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bias_ablation_gpu_size_needs_cuda(tmp_path):
    """The gpu setting (110M parameters on the pycode corpus) refuses a CPU-only machine before any work."""
    settings = bias_ablation.SETTINGS["gpu"]
    assert (settings.n_layer, settings.d_model, settings.n_head, settings.block_size) == (12, 768, 12, 1024)
    assert settings.corpus == "pycode" and len(settings.seeds) >= 2 and settings.recipe.compile == "off"
    with pytest.raises(sigattn.train.TrainError, match="train.device is 'cuda' but CUDA is not available"):
        run_experiment("bias-ablation", tmp_path, size="gpu", log=lambda line: None)
    assert not (tmp_path / "result.json").exists()


def test_pycode_corpus_for_experiments_is_the_presets(tmp_path, monkeypatch):
    """corpus_data("pycode") builds the corpus the code-gpt preset trains on (its vocabulary and split), once:
    the trainer's load finds the same folder."""
    from sigattn.data import load_pycode, roots_from_path
    from sigattn.train.presets import build_config

    monkeypatch.setenv("SIGATTN_CACHE_DIR", str(tmp_path / "cache"))
    data, description = lm.corpus_data("pycode", tmp_path, 200_000)
    preset = build_config("code-gpt").data
    for field in ("dataset", "tokenizer", "vocab_size", "val_fraction"):
        assert getattr(data, field) == getattr(preset, field), field
    assert data.max_bytes == 200_000 and "Python source files of the environment" in description
    load_pycode(
        roots_from_path(data.path), max_bytes=data.max_bytes, vocab_size=data.vocab_size, val_fraction=data.val_fraction
    )
    assert len(list((tmp_path / "cache").glob("pycode-*"))) == 1


def test_bias_ablation_gpu_path_runs_end_to_end_at_toy_size(tmp_path, monkeypatch):
    """The gpu setting's own path (the pycode corpus and its BPE, two seeds, eager runs), shrunk to a toy model
    on the CPU: it runs through and writes the multi-seed result, so the GPU run meets no untried code."""
    monkeypatch.setenv("SIGATTN_CACHE_DIR", str(tmp_path / "cache"))
    toy = replace(
        bias_ablation.SETTINGS["gpu"],
        corpus_chars=200_000,
        d_model=32,
        n_head=2,
        n_layer=1,
        block_size=32,
        recipe=replace(bias_ablation.SETTINGS["gpu"].recipe, steps=6, batch_size=4, warmup_steps=2, device="cpu"),
        init_lengths=(16, 32, 64),
    )
    monkeypatch.setitem(bias_ablation.SETTINGS, "gpu", toy)
    run_experiment("bias-ablation", tmp_path / "out", size="gpu", log=lambda line: None)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["meta"]["size"] == "gpu" and result["meta"]["device"] == "cpu"
    assert result["settings"]["corpus"] == "pycode" and result["settings"]["recipe"]["compile"] == "off"
    assert all(len(run["per_seed"]) == 2 for run in result["runs"].values())
    data = json.loads((tmp_path / "out" / "runs" / "b-logn_plain_seed0" / "data.json").read_text())
    assert data["files"]["taken"] > 0  # each run records the corpus it trained on
    assert "Python source files of the environment" in (tmp_path / "out" / "report.md").read_text()


def test_results_index_lists_gpu_results(tmp_path):
    """NAME-gpu gets its own row and section (with the GPU's name) only where it ran."""
    text = index.index_markdown(tmp_path, EXPERIMENTS)
    assert "bias-ablation-gpu" not in text
    folder = tmp_path / "bias-ablation-gpu"
    folder.mkdir()
    verdict = {"word": "supports", "summary": "s"}
    meta = {"size": "gpu", "seconds": 300.0, "date": "d", "command": "c", "device": "NVIDIA H100 80GB HBM3"}
    settings = {"seeds": [0, 1]}
    result = {"verdict": verdict, "settings": settings, "figures": ["f.png"], "meta": meta}
    (folder / "result.json").write_text(json.dumps(result))
    text = index.index_markdown(tmp_path, EXPERIMENTS)
    assert "| [bias-ablation-gpu](bias-ablation-gpu/report.md) | arXiv 2409.04431 | **supports** | 2 | gpu |" in text
    assert "## bias-ablation-gpu" in text and "![bias-ablation-gpu](bias-ablation-gpu/f.png)" in text
    assert "on NVIDIA H100 80GB HBM3" in text and "Other results here" not in text
