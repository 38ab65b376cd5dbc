"""Hugging Face profiler's input: models and arguments it refuses, prompt files read and refused, and
`moeplace profile --hf-model` on the command line. Its routing is tested in test_hf.py."""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig, PhimoeConfig, Qwen3MoeConfig

from hf_tiny_models import COMMON, FAMILIES, save_tiny_model
from moeplace.profiler.hf import profile_hf_model
from moeplace.profiler.prompts import read_prompt_file


# --- bad input ------------------------------------------------------------------------------------------


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="model directory not found"):
        profile_hf_model(tmp_path / "missing", ["hi"])
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ": no config.json"):
        profile_hf_model(tmp_path, ["hi"])
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: transformers cannot read it"):
        profile_hf_model(tmp_path, ["hi"])


def test_dense_and_unsupported_models_are_refused(tmp_path):
    LlamaConfig(**COMMON, num_hidden_layers=1).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"llama is not a Mixture-of-Experts model \(model_type llama\)"):
        profile_hf_model(tmp_path / "llama", ["hi"])
    PhimoeConfig(**COMMON, num_hidden_layers=1).save_pretrained(tmp_path / "phimoe")
    with pytest.raises(ValueError, match="model_type phimoe is a Mixture-of-Experts model .* not support"):
        profile_hf_model(tmp_path / "phimoe", ["hi"])
    dense = Qwen3MoeConfig(**COMMON, head_dim=16, num_hidden_layers=2, mlp_only_layers=[0, 1], num_experts=8)
    AutoModelForCausalLM.from_config(dense).save_pretrained(tmp_path / "all-dense")
    with pytest.raises(ValueError, match=r"is not a Mixture-of-Experts model \(model_type qwen3_moe, no MoE layers\)"):
        profile_hf_model(tmp_path / "all-dense", ["hi"])
    FAMILIES["mixtral"][0]().save_pretrained(tmp_path / "no-weights")
    with pytest.raises(ValueError, match="no-weights: transformers cannot load the model"):
        profile_hf_model(tmp_path / "no-weights", ["hi"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prompts": []}, "no prompts to profile"),
    ({"sample_rate": 1.5}, r"sample_rate must be in \[0, 1\], got 1.5"),
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"max_tokens": -1}, "max_tokens must be an integer >= 0, got -1"),
    ({"device": "gpu0"}, "device 'gpu0' is not a torch device"),
    ({"prompts": ["y" * 60], "max_tokens": 8}, "prompt 0: 60 tokens \\+ max_tokens 8 exceed .* 64"),
])
def test_bad_arguments(kwargs, message, tiny_model):
    kwargs = {"prompts": ["hi"], **kwargs}
    with pytest.raises(ValueError, match=message):
        profile_hf_model(tiny_model("mixtral"), **kwargs)


# --- prompt files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text"), [
    ("p.txt", "first prompt\n\n  second, with spaces  \r\nthird\n"),
    ("p.json", json.dumps(["first prompt", {"prompt": "  second, with spaces  "}, {"text": "third"}])),
    ("p.jsonl", '{"prompt": "first prompt"}\n\n"  second, with spaces  "\n{"text": "third", "id": 3}\n'),
])
def test_prompt_files(name, text, tmp_path):
    (tmp_path / name).write_text(text)
    assert read_prompt_file(tmp_path / name) == ["first prompt", "  second, with spaces  ", "third"]


@pytest.mark.parametrize(("name", "text", "problem"), [
    ("p.txt", "", "no prompts, the file is empty"),
    ("p.txt", " \n\n\t\n", "no prompts, the file is empty"),
    ("p.json", "[]", "no prompts, the JSON list is empty"),
    ("p.json", '[\n"a",\n"b" "c"\n]', "line 3: not valid JSON"),
    ("p.json", '{"prompt": "a"}', "expected a JSON list of prompts, got a JSON dict"),
    ("p.json", '["a", 7]', "item 1: prompt must be a string, got int"),
    ("p.json", '["a", {"question": "b"}]', "item 1: object has no \"prompt\" or \"text\" field"),
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": ""}\n', "line 2: prompt is empty"),
    ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b"\n', "line 3: not valid JSON"),
])
def test_bad_prompt_files(name, text, problem, tmp_path):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}") + ".*" + re.escape(problem)):
        read_prompt_file(path)


def test_missing_and_binary_prompt_files(tmp_path):
    with pytest.raises(ValueError, match="prompt file not found"):
        read_prompt_file(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="bin.txt: not UTF-8 text"):
        read_prompt_file(tmp_path / "bin.txt")


def test_cli_profile_hf_model(tmp_path):
    """`moeplace profile --hf-model DIR --prompts FILE -o trace` writes a trace; a dense model is one line + exit 1."""
    from typer.testing import CliRunner

    from moeplace.cli import app
    from moeplace.readers import load_trace

    model_dir = save_tiny_model("mixtral", tmp_path / "mixtral")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello experts\nthe GPU is hot\n")
    out = tmp_path / "trace.safetensors"
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(app, ["profile", "--hf-model", str(model_dir), "--prompts", str(prompts), "-o", str(out)])
    assert result.exit_code == 0, result.output
    trace = load_trace(out)
    assert trace.metadata["engine"] == "transformers (offline)" and trace.counts_WLE.sum() > 0
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = runner.invoke(app, ["profile", "--hf-model", str(model_dir), "--prompts", str(empty), "-o", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "Traceback" not in bad.output and "empty.txt" in bad.output
    assert not (tmp_path / "x").exists()
