"""Every way a model directory can be wrong gets one clear error naming the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import hyla
from hyla import CheckpointError


@pytest.fixture
def saved(tmp_path):
    hyla.save_pretrained(hyla.HylaForCausalLM(hyla.preset("tiny")), tmp_path / "m")
    return tmp_path / "m"


def edit_weights(saved, edit) -> None:
    """Rewrite the saved safetensors file after ``edit`` changes its dict of tensors."""
    tensors = load_file(saved / "model.safetensors")
    edit(tensors)
    save_file(tensors, saved / "model.safetensors")


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        hyla.load(tmp_path / "nope")


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        hyla.load(saved)


def test_config_not_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        hyla.load(saved)


def test_config_not_an_object(saved):
    (saved / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object of config fields, got a list"):
        hyla.load(saved)


def test_a_tokenizer_larger_than_the_model_is_refused(saved):
    from hyla.data.synthetic import word_tokenizer
    from hyla.errors import ConfigError
    from hyla.serve import LLM

    model = hyla.load(saved)
    words = word_tokenizer(model.config.vocab_size)  # more ids than the model's vocabulary
    with pytest.raises(ConfigError, match=f"the tokenizer has {words.get_vocab_size()} ids but the model only"):
        LLM(model, words)


def test_other_architecture(saved):
    raw = json.loads((saved / "config.json").read_text())
    raw["model_type"] = "llama"
    (saved / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="'llama' model"):
        hyla.load(saved)


def test_config_that_cannot_work(saved):
    raw = json.loads((saved / "config.json").read_text())
    raw["num_experts_per_tok"] = 9
    (saved / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="num_experts_per_tok"):
        hyla.load(saved)


def test_missing_weights_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        hyla.load(saved)


def test_missing_tensor_is_named(saved):
    edit_weights(saved, lambda t: t.pop("model.layers.3.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.self_attn\.k_proj\.weight"):
        hyla.load(saved)


def test_missing_expert_is_named(saved):
    edit_weights(saved, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(CheckpointError, match=r"experts\.2\.w3\.weight"):
        hyla.load(saved)


def test_misshaped_tensor_is_named(saved):
    edit_weights(saved, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(3,\), expected \(64,\)"):
        hyla.load(saved)


def test_corrupt_weights_file(saved):
    (saved / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        hyla.load(saved)


def test_missing_shard(tmp_path):
    hyla.save_pretrained(hyla.HylaForCausalLM(hyla.preset("tiny")), tmp_path, max_shard_size=100_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"shard .* is missing"):
        hyla.load(tmp_path)


def test_a_saved_model_is_readable_by_others_under_the_umask(tmp_path):
    """safetensors writes through a 0600 temporary file: the saved directory must follow the umask instead."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        hyla.save_pretrained(hyla.HylaForCausalLM(hyla.preset("tiny")), tmp_path / "m", hyla.byte_level_tokenizer())
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644, "tokenizer.json": 0o644}
