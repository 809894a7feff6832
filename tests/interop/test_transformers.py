"""hyla vs transformers' MiniMaxForCausalLM on the same weights, and checkpoints through both."""

import json
import warnings

import pytest
import torch
from transformers import MiniMaxForCausalLM
from transformers.utils import logging as hf_logging

import hyla
from hyla.config import LIGHTNING, SOFTMAX
from tests.conftest import rel_err
from tests.helpers import PATTERNS, random_model

hf_logging.set_verbosity_error()


def load_transformers(path, dtype=torch.float32) -> MiniMaxForCausalLM:
    # transformers' default experts kernel (grouped_mm) has no float64; its eager loop does.
    model, info = MiniMaxForCausalLM.from_pretrained(path, experts_implementation="eager", output_loading_info=True)
    assert not any(info.values()), f"transformers did not load the checkpoint cleanly: {info}"
    return model.to(dtype).eval()


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("t", [1, 37, 100])
def test_logits_match_transformers(tmp_path, pattern, t):
    model = random_model(layer_types=PATTERNS[pattern])
    hyla.save_pretrained(model, tmp_path)
    theirs = load_transformers(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (2, t))
    with torch.no_grad():
        ours32, theirs32 = model(ids, router_stats=True), theirs(ids, output_router_logits=True)
        assert rel_err(ours32.logits, theirs32.logits) <= 1e-5
        assert rel_err(ours32.aux_loss, theirs32.aux_loss) <= 1e-5
        # float64: transformers keeps its decay buffers, norm statistics and router in float32, so the two
        # differ at float32's resolution (~1e-7), not float64's.
        ours64, theirs64 = model.double()(ids), theirs.double()(ids, output_router_logits=True)
        assert rel_err(ours64.logits, theirs64.logits) <= 1e-6


@pytest.mark.parametrize("tie", [False, True])
def test_loss_matches_transformers(tmp_path, tie):
    model = random_model(tie_word_embeddings=tie)
    hyla.save_pretrained(model, tmp_path)
    theirs = load_transformers(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (3, 50))
    labels = ids.clone()
    labels[0, :10] = -100
    with torch.no_grad():
        ours, ref = model.loss(ids, labels=labels), theirs(ids, labels=labels)
    assert rel_err(ours.loss, ref.loss) <= 1e-6


def test_round_trip_through_transformers_changes_nothing(tmp_path):
    model = random_model()
    hyla.save_pretrained(model, tmp_path / "a")
    theirs = load_transformers(tmp_path / "a")
    theirs.save_pretrained(tmp_path / "b")
    back = hyla.load(tmp_path / "b")
    assert back.config == model.config
    ours, again = model.state_dict(), back.state_dict()
    assert ours.keys() == again.keys()
    for name in ours:
        assert torch.equal(ours[name], again[name]), name


def test_sharded_checkpoint_round_trip(tmp_path):
    model = random_model()
    hyla.save_pretrained(model, tmp_path, max_shard_size=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = hyla.load(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    # transformers reads the shards too
    theirs = load_transformers(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    with torch.no_grad():
        assert rel_err(model(ids).logits, theirs(ids).logits) <= 1e-5


def test_save_keeps_other_files_and_replaces_weights(tmp_path):
    hyla.save_pretrained(random_model(), tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    second = random_model()
    hyla.save_pretrained(second, tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    assert torch.equal(hyla.load(tmp_path).lm_head.weight, second.lm_head.weight)
    assert [p.name for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}")] == []


def test_original_minimax_config_fields(tmp_path):
    """MiniMax-Text-01's remote-code config: attn_type_list, layernorm_*_alpha/beta, postnorm, rope_theta."""
    model = random_model(layer_types=[LIGHTNING, LIGHTNING, SOFTMAX])
    hyla.save_pretrained(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    c = model.config
    original = {k: v for k, v in raw.items() if k not in ("layer_types", "rope_parameters", "head_dim")}
    original = {k: v for k, v in original.items() if not k.endswith("_factor")}
    original.update(
        model_type="minimax_text_01",
        architectures=["MiniMaxText01ForCausalLM"],
        attn_type_list=[0, 0, 1],
        rope_theta=c.rope_theta,
        postnorm=True,
        layernorm_linear_attention_alpha=c.linear_attn_alpha_factor,
        layernorm_linear_attention_beta=1.0,
        layernorm_full_attention_alpha=c.full_attn_alpha_factor,
        layernorm_full_attention_beta=1.0,
        layernorm_mlp_alpha=c.mlp_alpha_factor,
        layernorm_mlp_beta=c.mlp_beta_factor,
    )
    (tmp_path / "config.json").write_text(json.dumps(original))
    back = hyla.load(tmp_path)
    assert back.config == model.config
    ids = torch.randint(0, c.vocab_size, (1, 30))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_partial_rotary_and_prenorm_round_trip_through_hyla(tmp_path):
    model = random_model(rotary_dim=8, postnorm=False)
    with pytest.warns(UserWarning, match="rotates 8 of 16 dims per head"):  # transformers would rotate all 16
        hyla.save_pretrained(model, tmp_path)
    with pytest.warns(UserWarning, match="transformers' MiniMax rotates all 16"):
        back = hyla.load(tmp_path)
    assert back.config.rotary_dim == 8 and back.config.postnorm is False
    ids = torch.randint(0, model.config.vocab_size, (1, 30))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_partial_rotary_is_the_configs_and_transformers_disagreement_is_named(tmp_path):
    """A transformers-format config asking for partial rotary: hyla rotates what it says (MiniMax-Text-01's math),
    which is not what transformers computes — a warning says so, and the logits differ from transformers'. The
    original remote-code format (rotary_dim, model_type minimax_text_01) is read without a warning."""
    from hyla.interop.transformers import config_from_hf

    model = random_model()
    hyla.save_pretrained(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["rotary_dim"]
    raw["rope_parameters"]["partial_rotary_factor"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="rotates 8 of 16 dims per head"):
        ours = hyla.load(tmp_path)
    assert ours.config.rotary_dim == 8
    theirs = load_transformers(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    with torch.no_grad():
        assert rel_err(theirs(ids).logits, model(ids).logits) <= 1e-5  # transformers: the whole head
        assert rel_err(ours(ids).logits, model(ids).logits) > 1e-3  # hyla: half of it
    original = {**raw, "model_type": "minimax_text_01", "rotary_dim": 8}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config_from_hf(original).rotary_dim == 8


def test_gradients_match_transformers(tmp_path):
    """Backward through every layer kind: parameter gradients of the same loss equal transformers'."""
    from hyla.interop import state_dict_to_hf

    model = random_model(layer_types=[LIGHTNING, SOFTMAX, LIGHTNING]).double().train()
    hyla.save_pretrained(model, tmp_path)
    theirs = load_transformers(tmp_path, torch.float64).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 45))
    out = model.loss(ids)
    (out.loss + 0.1 * out.aux_loss).backward()
    ref = theirs(ids, labels=ids, output_router_logits=True)
    (ref.loss - theirs.router_aux_loss_coef * ref.aux_loss + 0.1 * ref.aux_loss).backward()
    ours = state_dict_to_hf({n: p.grad for n, p in model.named_parameters()}, model.config)
    # transformers holds experts fused in memory; compare through its own per-expert names on disk.
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters()}
    buffers = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
    for name, grad in ours.items():
        if name.endswith(buffers):
            continue
        if ".experts." in name:
            layer, expert, w = name.split(".")[2], int(name.split(".")[5]), name.split(".")[6]
            inter = model.config.intermediate_size
            fused = theirs_grads[f"model.layers.{layer}.mlp.experts.gate_up_proj"][expert]
            ref_grad = {"w1": fused[:inter], "w3": fused[inter:]}.get(w)
            if ref_grad is None:
                ref_grad = theirs_grads[f"model.layers.{layer}.mlp.experts.down_proj"][expert]
        else:
            ref_grad = theirs_grads[name.replace("block_sparse_moe.gate", "mlp.gate")]
        assert rel_err(grad, ref_grad) <= 1e-6, name
