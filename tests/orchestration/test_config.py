import pytest

from orchestration.config import Config, ConfigError, load_config, parse_overrides


def test_preset_and_overrides_are_typed():
    cfg = load_config("tiny", ["train.lr=3e-4", "download.allow_hosts=[127.0.0.1, 127.0.0.3]", "seed=7"])
    assert isinstance(cfg, Config)
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.seed == 7
    assert cfg.download.allow_hosts == ["127.0.0.1", "127.0.0.3"]
    assert cfg.download.image_size == 64  # from the tiny preset


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lrr=1"])
    assert "'train.lrr'" in str(e.value) and "lr" in str(e.value) and "steps" in str(e.value)


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["oops"])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="presets: .*tiny"):
        load_config("nope")
