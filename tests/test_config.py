"""ModelConfig validation, JSON round trip, overrides and config files."""

import pytest

from nanomoe.config import ModelConfig, parse_overrides
from nanomoe.errors import ConfigError
from nanomoe.presets import PRESETS, get_preset, resolve_model_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips_through_json(name):
    cfg = get_preset(name)
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_none_sizes_are_resolved_so_round_trip_is_exact():
    cfg = ModelConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8, ffn="swiglu")
    assert cfg.n_kv_head == 2 and cfg.ffn_hidden == 64 and cfg.expert_hidden == 64
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(n_head=5), "divisible by n_head"),
        (dict(top_k=9), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(vocab_size=0), "vocab_size must be an integer >= 1"),
        (dict(block_size=0), "block_size"),
        (dict(n_kv_head=3), "n_kv_head"),
        (dict(position="alibi"), "position must be one of"),
        (dict(router="hash"), "router must be one of"),
        (dict(ffn="tanh"), "ffn must be one of"),
        (dict(norm="batchnorm"), "norm must be one of"),
        (dict(dropout=1.5), "dropout"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(moe_every=0), "moe_every"),
        (dict(n_experts=-2), "n_experts"),
        (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
    ],
)
def test_bad_configs_raise_clear_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("debug", **changes)


def test_error_suggests_a_valid_head_count():
    with pytest.raises(ConfigError, match="try n_head=4"):
        get_preset("tiny-moe", n_head=5)


def test_unknown_field_and_preset_are_named():
    with pytest.raises(ConfigError, match="unknown ModelConfig field.*n_layers"):
        get_preset("debug", n_layers=3)
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        get_preset("nope")


def test_overrides_are_parsed_by_field_type():
    values = parse_overrides(ModelConfig, ["n_layer=3", "dropout=0.1", "bias=true", "router=switch", "n_kv_head=none"])
    assert values == dict(n_layer=3, dropout=0.1, bias=True, router="switch", n_kv_head=None)
    with pytest.raises(ConfigError, match="cannot parse n_layer"):
        parse_overrides(ModelConfig, ["n_layer=three"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(ModelConfig, ["n_layer"])


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_config_files_layer_over_the_preset(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    if suffix == ".toml":
        path.write_text('preset = "tiny-moe"\n[model]\nn_layer = 3\n')
    elif suffix == ".yaml":
        path.write_text("preset: tiny-moe\nmodel:\n  n_layer: 3\n")
    else:
        path.write_text('{"preset": "tiny-moe", "model": {"n_layer": 3}}')
    cfg = resolve_model_config(config_file=path, overrides=["top_k=1"])
    assert cfg == get_preset("tiny-moe", n_layer=3, top_k=1)


def test_bad_config_file_is_reported(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("model = [")
    with pytest.raises(ConfigError, match="cannot parse config file"):
        resolve_model_config(config_file=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_config(config_file=tmp_path / "missing.toml")


def test_shipped_config_files_are_valid():
    from pathlib import Path

    from nanomoe.training.config import resolve_train_config

    files = sorted((Path(__file__).parent.parent / "configs").glob("*.*"))
    assert files
    for path in files:
        resolve_model_config(config_file=path)
        resolve_train_config(config_file=path)
