"""The converter on a tiny random BERT (nothing is downloaded).

The calibrated bias is checked against the mass recomputed here from the model's own hidden states and
query/key weights: with it, the sigmoid weights of a real token's query sum to 1 on average. The
converted model trains with its attention dropout, survives save/load, and ``sigattn convert`` does the
same from the command line, and a model directory it cannot load (no folder, no or unreadable config.json,
a model type or architecture transformers does not know) is one line on stderr naming the file.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import BertConfig, BertModel, BertTokenizer  # noqa: E402

from sigattn import cli  # noqa: E402
from sigattn.integrations import convert  # noqa: E402
from sigattn.integrations import transformers as sigmoid_hf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "with", "as", "was", "by"]


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=48,
        max_position_embeddings=64,
        attention_probs_dropout_prob=0.1,
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    model.set_attn_implementation("sdpa")
    return model


def batches():
    gen = torch.Generator().manual_seed(1)
    out = []
    for lengths in ([12, 7, 9], [5, 12, 3]):
        ids = torch.randint(5, 5 + len(WORDS), (3, max(lengths)), generator=gen)
        mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def real_logits(model, batch) -> list[torch.Tensor]:
    """Per layer, (H, pairs) scaled logits of real (query, key) token pairs, from the softmax model."""
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    pairs = real[:, :, None] & real[:, None, :]  # [B, Sq, Sk]
    logits = []
    for layer, h in zip(model.encoder.layer, hidden, strict=False):
        attn = layer.attention.self
        heads, dim = attn.num_attention_heads, attn.attention_head_size
        q = attn.query(h).unflatten(-1, (heads, dim)).transpose(1, 2)
        k = attn.key(h).unflatten(-1, (heads, dim)).transpose(1, 2)
        s = q @ k.transpose(-1, -2) / math.sqrt(dim)  # [B, H, Sq, Sk]
        logits.append(s.transpose(0, 1)[:, pairs])  # [H, pairs]
    return logits


def mean_mass(logits: torch.Tensor, bias: torch.Tensor, queries: int) -> torch.Tensor:
    return torch.sigmoid(logits.double() + bias.double()[:, None]).sum(-1) / queries


@pytest.mark.parametrize("granularity", convert.GRANULARITIES)
def test_calibrated_bias_makes_the_mean_mass_one(granularity):
    model = tiny_bert()
    data = batches()
    bias = convert.calibrate_bias(model, data, granularity)
    assert model.config._attn_implementation == "sdpa"  # restored
    per_batch = [real_logits(model, b) for b in data]
    queries = sum(int(b["attention_mask"].sum()) for b in data)
    for layer in range(2):
        logits = torch.cat([p[layer] for p in per_batch], dim=1)  # [H, pairs]
        if granularity == "head":
            masses = mean_mass(logits, torch.tensor(bias[layer]), queries)
        else:
            value = bias[layer] if granularity == "layer" else bias
            masses = mean_mass(logits.reshape(1, -1), torch.tensor([value]), queries * logits.shape[0])
        if granularity != "model":
            torch.testing.assert_close(masses, torch.ones_like(masses), atol=5e-3, rtol=0)
    if granularity == "model":
        logits = torch.cat([torch.cat([p[layer] for p in per_batch], dim=1).reshape(-1) for layer in range(2)])
        mass = mean_mass(logits[None], torch.tensor([bias]), queries * 4 * 2)
        torch.testing.assert_close(mass, torch.ones_like(mass), atol=5e-3, rtol=0)


def test_converted_model_trains_and_round_trips(tmp_path):
    model = tiny_bert()
    report = convert.convert_to_sigmoid(model, batches())
    assert model.config._attn_implementation == "sigmoid"
    assert model.config.sigmoid_attn_bias == report["bias"] and len(report["bias"]) == 2
    assert model.config.attention_probs_dropout_prob == 0.1  # sigmoid attention applies it in training
    model.train()
    batch = batches()[0]
    torch.manual_seed(0)
    trained = model(**batch).last_hidden_state
    trained.sum().backward()
    torch.manual_seed(0)
    torch.testing.assert_close(model(**batch).last_hidden_state, trained, rtol=0, atol=0)  # the same draws
    assert model.encoder.layer[0].attention.self.query.weight.grad is not None

    model.eval()
    expected = model(**batch).last_hidden_state
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attn_implementation"] == "sigmoid"
    sigmoid_hf.register()
    loaded = BertModel.from_pretrained(tmp_path).eval()  # the saved config names the implementation
    assert loaded.config._attn_implementation == "sigmoid"
    assert loaded.config.sigmoid_attn_bias == report["bias"]
    torch.testing.assert_close(loaded(**batch).last_hidden_state, expected)


def test_converted_model_does_not_load_as_softmax_without_register(tmp_path):
    """A fresh process that never called register(): from_pretrained refuses the model, loudly, rather than
    building it with softmax attention (transformers' default when config.json names no implementation)."""
    model = tiny_bert()
    convert.convert_to_sigmoid(model, bias=-3.0)
    model.save_pretrained(tmp_path)
    script = (
        "import sys\n"
        "from transformers import BertModel\n"
        "try:\n"
        "    model = BertModel.from_pretrained(sys.argv[1])\n"
        "except ValueError as error:\n"
        "    print(error)\n"
        "    raise SystemExit(3)\n"
        "print('loaded with', model.config._attn_implementation)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr
    assert 'attn_implementation="sigmoid"` is not supported' in result.stdout


def test_explicit_bias_needs_no_calibration():
    model = tiny_bert()
    report = convert.convert_to_sigmoid(model, bias=-3.0)
    assert report["bias"] == -3.0 and model.config.sigmoid_attn_bias == -3.0
    with pytest.raises(ValueError, match="granularity must be one of"):
        convert.calibrate_bias(tiny_bert(), batches(), "row")
    with pytest.raises(ValueError, match="needs calibration_batches"):
        convert.convert_to_sigmoid(tiny_bert())
    untouched = tiny_bert()
    for bad in (math.nan, -math.inf, [-3.0, [1.0, math.nan]]):
        with pytest.raises(ValueError, match="sigmoid_attn_bias must be a finite float"):
            convert.convert_to_sigmoid(untouched, bias=bad)
    assert untouched.config._attn_implementation == "sdpa" and not hasattr(untouched.config, "sigmoid_attn_bias")


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--bias", "nan", "a finite number"),
        ("--samples", "-1", "a positive int"),
        ("--batch-size", "0", "a positive int"),
        ("--max-length", "0", "a positive int"),
    ],
)
def test_cli_refuses_bad_numbers(tmp_path, capsys, option, value, expected):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", str(tmp_path / "model"), str(tmp_path / "out"), option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: expected {expected}, got '{value}'" in capsys.readouterr().err


def test_docstring_sentences_are_text():
    sentences = convert.docstring_sentences()
    assert len(sentences) > 1000 and sentences == sorted(set(sentences))
    assert all(s.isascii() and 30 <= len(s) <= 250 for s in sentences)


def test_cli_converts_a_local_model(tmp_path, capsys):
    source, target = tmp_path / "bert", tmp_path / "bert-sigmoid"
    tiny_bert().save_pretrained(source)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(source)
    text = tmp_path / "text.txt"
    text.write_text("the cat is on the mat\nit was a dark and stormy night\nfor this is that\n")

    status = cli.main(["convert", str(source), str(target), "--text", str(text), "--granularity", "layer"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "sigmoid_attn_bias per layer" in out
    config = json.loads((target / "config.json").read_text())
    assert config["attn_implementation"] == "sigmoid"
    assert len(config["sigmoid_attn_bias"]) == 2 and all(isinstance(b, float) for b in config["sigmoid_attn_bias"])
    assert (target / "tokenizer_config.json").exists()

    status = cli.main(["convert", str(tmp_path / "missing"), str(target)])
    assert status == 2 and "sigattn convert: error:" in capsys.readouterr().err
    status = cli.main(["convert", str(source), str(text), "--bias", "-3"])  # into a file: nothing to write to
    assert status == 2 and f"sigattn convert: error: {text} is a file, not a folder" in capsys.readouterr().err
    assert text.read_text().startswith("the cat")


@pytest.mark.parametrize(
    "output, message",
    [
        ("bert", "output {output} is the model folder {model}: the converted model would overwrite it"),
        ("bert/../bert/.", "output {output} is the model folder {model}: the converted model would overwrite it"),
        ("missing/out", "output {output}: the folder {parent} does not exist: create it first (mkdir -p"),
    ],
    ids=["the-model-folder", "the-model-folder-spelled-otherwise", "missing-parent"],
)
def test_cli_refuses_an_output_over_the_model_or_under_no_folder(tmp_path, capsys, output, message):
    """Refused before the model is loaded (this one is no model at all): nothing is written."""
    model, output = tmp_path / "bert", tmp_path / output
    model.mkdir()
    (model / "config.json").write_text("{}")
    status = cli.main(["convert", str(model), str(output), "--bias", "-3"])
    expected = message.format(output=output, model=model, parent=output.parent)
    assert status == 2 and f"sigattn convert: error: {expected}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert"] and (model / "config.json").read_text() == "{}"


def unknown_architecture(folder: Path) -> None:
    tiny_bert().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["FrobnicatorModel"]}))


def config_file(text: str):
    def write(folder: Path) -> None:
        folder.mkdir()
        (folder / "config.json").write_text(text)

    return write


# How each model directory is made, and what the error says after "FOLDER" or "FOLDER/config.json".
BAD_MODEL_DIRS = {
    "no-folder": (lambda folder: None, ": no such directory (convert reads a local model directory"),
    "no-config": (lambda folder: folder.mkdir(), "/config.json: no such file: "),
    "not-json": (config_file('{"model_type": '), "/config.json: expected a JSON object, got text that is not JSON ("),
    "unknown-model-type": (
        config_file('{"model_type": "frobnicator", "architectures": ["FrobnicatorModel"]}'),
        "/config.json: expected a model_type that transformers " + transformers.__version__ + " knows, got "
        "'frobnicator'; upgrade transformers or fix the file",
    ),
    "unknown-architecture": (
        unknown_architecture,
        "/config.json: architecture 'FrobnicatorModel' is not a model class of transformers "
        + transformers.__version__,
    ),
}


@pytest.mark.parametrize("case", list(BAD_MODEL_DIRS))
def test_cli_names_a_model_directory_it_cannot_load(tmp_path, case):
    make, message = BAD_MODEL_DIRS[case]
    folder = tmp_path / "model"
    make(folder)
    env = {k: v for k, v in os.environ.items() if k not in ("SIGATTN_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "sigattn.cli", "convert", str(folder), str(tmp_path / "out"), "--bias", "-3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert "Traceback" not in result.stderr and result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sigattn convert: error: {folder}{message}"), result.stderr
    assert not (tmp_path / "out").exists()
