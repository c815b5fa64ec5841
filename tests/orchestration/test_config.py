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


# -- issue 32 L7-L10, I5: the review's config cases, each a ConfigError (rc 2 from the CLI) ----------
@pytest.mark.parametrize("override,message", [
    ("train.log_every=0", "log_every"), ("train.checkpoint_every=0", "checkpoint_every"), ("train.lr=-1", "lr > 0"),
    ("capfilt.decode_num_cpus=-1", "decode_num_cpus"), ("curate.nsfw.threshold=nan", "expected a finite number"),
    ("curate.nsfw.threshold=2", "probability"), ("search.k=-1", "k, nprobe"), ("search.nprobe=0", "k, nprobe"),
    ("download.timeout=nan", "download.timeout: expected a finite number"),
    ("download.deadline=inf", "download.deadline: expected a finite number"),
    ("download.timeout=" + "9" * 400, "download.timeout: expected a number"),
    ('seed=!!python/object/apply:os.system ["touch MARKER"]', "not valid YAML"), ("seed=[1,", "not valid YAML"),
])
def test_values_validation_used_to_accept_are_refused(override, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        load_config(None, [override])
    assert not (tmp_path / "MARKER").exists()


def test_config_and_yaml_errors_are_config_errors_never_tracebacks(tmp_path):
    from orchestration.cli import main

    bad = {"tags.yaml": b"seed: !!python/object/new:subprocess.Popen [[touch, MARKER]]\n",
           "broken.yaml": b"train: {lr: [\n", "latin1.yaml": b"seed: \xff\xfe\n",
           "self.yaml": b"base: SELF\nseed: 1\n", "loop_a.yaml": b"base: LOOP_B\n", "loop_b.yaml": b"base: LOOP_A\n",
           "bomb.yaml": b"a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"}
    for name, data in bad.items():
        data = data.replace(b"SELF", str(tmp_path / "self.yaml").encode())
        (tmp_path / name).write_bytes(data.replace(b"LOOP_A", str(tmp_path / "loop_a.yaml").encode())
                                      .replace(b"LOOP_B", str(tmp_path / "loop_b.yaml").encode()))
    (tmp_path / "dir.yaml").mkdir()
    messages = {}
    for name in [*bad, "dir.yaml"]:
        with pytest.raises(ConfigError) as e:
            load_config(str(tmp_path / name))
        messages[name] = str(e.value)
        assert main(["config", "--config", str(tmp_path / name)]) == 2
    assert "aliases (*name) are not allowed" in messages["bomb.yaml"]
    assert "base chain comes back to itself" in messages["self.yaml"] and "itself" in messages["loop_a.yaml"]
    assert "cannot be read" in messages["latin1.yaml"] and "no config" in messages["dir.yaml"]
    with pytest.raises(ConfigError, match="sets a key inside 'seed'"):
        load_config(None, ["seed=1", "seed.x=2"])
    assert main(["config", "seed=1", "seed.x=2"]) == 2
    with pytest.raises(ConfigError, match="no config"):  # I5: a name without a suffix never walks out of the presets
        load_config("../../" + str(tmp_path / "self").lstrip("/"))
    assert not (tmp_path / "MARKER").exists()
