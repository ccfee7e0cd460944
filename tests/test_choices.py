"""One definition per knob: the sampler's settings are the config's sampler section, and every enumerated
field's allowed values live in pipeline.config.CHOICES, which validation, the sampler and the CLI read."""
from __future__ import annotations

import dataclasses

import pytest

from ops.guidance import GUIDANCE_MODES, SIGMA_MODES
from pipeline.cli import build_parser
from pipeline.config import CHOICES, ConfigError, DistillConfig, SamplerSection, build_config, validate
from pipeline.models.sampler import SamplerConfig


def test_every_enumerated_field_is_checked_against_its_choices():
    for name, options in CHOICES.items():
        section, key = name.split(".")
        assert getattr(getattr(DistillConfig(), section), key) in options, name  # the default is allowed
        for value in options:  # every allowed value passes
            validate(build_config({section: {key: value}}), need_paths=False)
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
            validate(build_config({section: {key: "no-such-value"}}), need_paths=False)


def test_the_sampler_settings_are_the_config_section():
    section_fields = {f.name for f in dataclasses.fields(SamplerSection)}
    assert section_fields <= {f.name for f in dataclasses.fields(SamplerConfig)}
    cfg = build_config({"seed": 7, "sampler": {"guidance": "mode", "t_stop": 3, "sigma": "elementwise",
                                                "max_batch": 5, "cfg_channels": "all"}})
    s = SamplerConfig.from_config(cfg)
    assert all(getattr(s, name) == getattr(cfg.sampler, name) for name in section_fields)
    assert s.seed == 7
    for name in ("sampler.guidance", "sampler.sigma", "sampler.sampler", "sampler.cfg_channels"):
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            SamplerConfig(**{name.split(".")[1]: "no-such-value"})
    assert CHOICES["sampler.guidance"] is GUIDANCE_MODES and CHOICES["sampler.sigma"] is SIGMA_MODES


def test_the_command_line_help_lists_the_same_choices():
    text = build_parser(["distill"])._subparsers._group_actions[0].choices["distill"].format_help()
    assert " | ".join(CHOICES["sampler.guidance"]) in " ".join(text.split())
    assert " | ".join(CHOICES["cluster.method"]) in " ".join(text.split())
