"""Config: profiles, YAML files, typed overrides, clear errors."""

from __future__ import annotations

import pytest
from slimrec.config import ConfigError, PipelineConfig, load_config, parse_override


def test_profiles_load_and_differ():
    tiny, dev = load_config("tiny"), load_config("dev")
    assert tiny.profile == "tiny" and dev.profile == "dev"
    assert tiny.teacher.sample_size < dev.teacher.sample_size
    assert load_config("prod").teacher.kind == "http"


def test_overrides_are_typed():
    cfg = load_config("dev", overrides=["recommender.seeds=[4,5]", "spark.master=spark://h:7077",
                                        "sequences.k_core=5"])
    assert cfg.recommender.seeds == [4, 5]
    assert cfg.spark.master == "spark://h:7077"
    assert cfg.sequences.k_core == 5
    assert parse_override("a.b=0.5") == {"a": {"b": 0.5}}
    assert parse_override("a.b=[x, y]") == {"a": {"b": ["x", "y"]}}


@pytest.mark.parametrize(
    "override,message",
    [
        ("sequences.k_core=lots", "sequences.k_core"),
        ("sequences.no_such_field=1", "no_such_field"),
        ("nonsense", "not key=value"),
        ("sequences.min_seq_len=1", "sequences.min_seq_len: Input should be greater than or equal to 2"),
        ("sequences.max_seq_len=2", "max_seq_len 2 < min_seq_len 3"),
    ],
)
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("dev", overrides=[override])


def test_unknown_profile_and_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile 'huge'; known: dev, prod, tiny"):
        load_config("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("dev", tmp_path / "missing.yaml")
    f = tmp_path / "c.yaml"
    f.write_text("prompts:\n  max_items: 7\n")
    assert load_config("dev", f).prompts.max_items == 7


def test_frozen_and_hash_stable():
    cfg = load_config("dev")
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError on frozen models
        cfg.profile = "x"
    assert cfg.config_hash() == load_config("dev").config_hash()
    assert cfg.config_hash() != load_config("dev", overrides=["prompts.max_items=3"]).config_hash()


def test_every_field_has_a_description():
    def walk(model, path=""):
        for name, f in model.model_fields.items():
            assert f.description, f"{path}{name} has no description"
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{path}{name}.")

    walk(PipelineConfig)
