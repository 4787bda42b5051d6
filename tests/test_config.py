"""DecodeConfig refuses invalid settings at construction, naming the field and the fix."""
import json

import pytest

from prophet import PRESETS, ConfigError, DecodeConfig


@pytest.mark.parametrize("kw,words", [
    (dict(gen_length=64, block_length=24), ["block_length", "divides"]),
    (dict(gen_length=64, block_length=16, steps=30), ["steps", "number of blocks"]),
    (dict(thresholds=(5.0, 8.0, 3.0)), ["thresholds", "non-increasing"]),
    (dict(thresholds=(8.0, 5.0)), ["thresholds", "three"]),
    (dict(steps=65), ["steps", "gen_length"]),
    (dict(region="anchor"), ["anchor_ids", "region"]),
    (dict(region="anchor", anchor_ids=(5, 6), answer_window=70), ["anchor", "answer_window", "gen_length"]),
    (dict(anchor_ids=(5,), anchor_offset=64), ["anchor", "offset"]),
    (dict(anchor_ids=tuple(range(64)), anchor_offset=0), ["anchor", "leave a position"]),
    (dict(host="dream", block_length=24), ["block_length", "divides"]),
    (dict(cache="full"), ["cache", "prefix", "dual"]),
    (dict(cache="prefix", cache_refresh_every=0), ["cache_refresh_every", "positive"]),
    (dict(rule="fast"), ["rule", "prophet"]),
    (dict(statistic="median"), ["statistic", "quantile"]),
    (dict(quantile=1.5), ["quantile"]),
    (dict(confidence=1.0), ["confidence"]),
    (dict(batch_size=0), ["batch_size", "positive"]),
    (dict(top_p=0.0), ["top_p"]),
    (dict(temperature=-1.0), ["temperature"]),
])
def test_invalid_settings_are_refused_with_field_and_fix(kw, words):
    with pytest.raises(ConfigError) as err:
        DecodeConfig(**kw)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_defaults_and_presets():
    cfg = DecodeConfig()
    assert cfg.thresholds == PRESETS["default"] == (8.0, 5.0, 3.0)
    assert PRESETS["paper"] == (7.5, 5.0, 2.5) and PRESETS["paper_gsm8k"] == (8.0, 5.0, 3.5)
    assert cfg.num_blocks == 1 and DecodeConfig(gen_length=64, block_length=16, steps=32).num_blocks == 4


def test_anchor_goes_as_late_as_fits_by_default():
    cfg = DecodeConfig(gen_length=32, steps=32, region="anchor", anchor_ids=(5, 6, 7), answer_window=5)
    assert cfg.anchor_start == 32 - 3 - 1 - 5


def test_thresholds_are_normalised_to_float_tuples_and_the_dict_round_trips():
    cfg = DecodeConfig(thresholds=[8, 5, 3], anchor_ids=[5], anchor_offset=2)
    assert cfg.thresholds == (8.0, 5.0, 3.0) and cfg.anchor_ids == (5,)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert DecodeConfig(**{**d, "thresholds": tuple(d["thresholds"]), "anchor_ids": tuple(d["anchor_ids"])}) == cfg


def test_calibration_file_sets_the_rule_fields_only(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"decode": {"rule": "prophet", "thresholds": [6, 4, 2], "statistic": "min"}}))
    cfg = DecodeConfig(gen_length=16, steps=16).with_calibration(path)
    assert (cfg.rule, cfg.thresholds, cfg.statistic, cfg.gen_length) == ("prophet", (6.0, 4.0, 2.0), "min", 16)
    path.write_text(json.dumps({"decode": {"steps": 3}}))
    with pytest.raises(ConfigError, match="unknown"):
        DecodeConfig().with_calibration(path)
