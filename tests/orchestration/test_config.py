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


def test_local_paths_become_absolute_hub_ids_and_urls_stay(tmp_path, monkeypatch):
    """Ray Train workers run in their run's artifacts folder: a relative path must not reach them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "vision").mkdir(parents=True)
    cfg = load_config("tiny", ["model.vision_path=models/vision", "train.output=runs/train",
                               "capfilt.captioner=Salesforce/blip-image-captioning-large",
                               "capfilt.ranker=s3://bucket/clip", "model.llm_path=missing/opt"])
    assert cfg.model.vision_path == str(tmp_path / "models" / "vision")
    assert cfg.train.output == str(tmp_path / "runs" / "train")          # outputs: always
    assert cfg.capfilt.captioner == "Salesforce/blip-image-captioning-large"  # not a local folder: a hub id
    assert cfg.capfilt.ranker == "s3://bucket/clip"
    assert cfg.model.llm_path == "missing/opt"                           # inputs only when they exist


def test_the_image_resolution_is_one_key_model_image_size():
    """Ingest crops to it, eval resizes to it, ``preprocess`` uses it: ``model.image_size``."""
    assert load_config("tiny").model.image_size == 64
    assert load_config("paper_stage1_vitg").model.image_size == 224
    assert load_config("paper_stage2_opt2_7b").model.image_size == 224
    with pytest.raises(ConfigError, match="unknown config key 'train.image_size'"):
        load_config("tiny", ["train.image_size=64"])


def test_ingest_is_its_own_section():
    """``ingest.*`` is declared in training/ingest.py; its keys left ``train.*``."""
    cfg = load_config("tiny", ["ingest.shuffle_window=4", "ingest.source_weights={coco: 2}", "ingest.hflip=false"])
    assert (cfg.ingest.shuffle_window, cfg.ingest.source_weights, cfg.ingest.hflip) == (4, {"coco": 2}, False)
    assert cfg.ingest.map_batch_size == 16                                  # from the tiny preset
    assert load_config("paper_stage1_vitg").ingest.map_batch_size == 64
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ingest.shufle_window=4"])
    assert "'ingest.shufle_window'" in str(e.value) and "valid keys in ingest:" in str(e.value)
    assert "shuffle_window" in str(e.value) and "cpus_per_task" in str(e.value)
    with pytest.raises(ConfigError, match="unknown config key 'train.shuffle_window'"):
        load_config(None, ["train.shuffle_window=4"])
    with pytest.raises(ConfigError, match="ingest: caption_pick must be random or first"):
        load_config(None, ["ingest.caption_pick=best"])


def test_tracking_is_its_own_section():
    """``tracking.*`` is declared in training/trackers.py; a backend's package is checked when
    training starts, so the config is read (and printed) where it is not installed."""
    cfg = load_config("tiny", ["tracking.tensorboard=true", "tracking.wandb_mode=offline"])
    assert cfg.tracking.tensorboard and cfg.tracking.wandb_mode == "offline"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["tracking.wandb_projet=p"])
    assert "'tracking.wandb_projet'" in str(e.value) and "valid keys in tracking:" in str(e.value)
    with pytest.raises(ConfigError, match="unknown config key 'train.tensorboard'"):
        load_config(None, ["train.tensorboard=true"])
