"""RetentionConfig: defaults, validation and torch.compile options."""

import pytest

from retention_compile.config import RetentionConfig


def test_defaults_match_design():
    cfg = RetentionConfig()
    assert (cfg.deg, cfg.gate, cfg.non_causal, cfg.sliding_window, cfg.dropout, cfg.strict) == (
        2,
        "none",
        "retention",
        "full",
        "ignore",
        False,
    )
    assert cfg.chunk_size is None and cfg.codegen == "auto"


def test_from_options():
    cfg = RetentionConfig.from_options({"deg": 4, "non_causal": "keep", "chunk_size": 128})
    assert (cfg.deg, cfg.non_causal, cfg.chunk_size) == (4, "keep", 128)
    assert RetentionConfig.from_options(None) == RetentionConfig()
    assert RetentionConfig.from_options(cfg) is cfg


@pytest.mark.parametrize(
    "options,message",
    [
        ({"degree": 2}, "unknown retention option"),
        ({"deg": 3}, "even integer"),
        ({"gate": "rope"}, "gate must be one of"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"codegen": "cutlass"}, "codegen must be one of"),
        ({"strict": "yes"}, "strict must be a bool"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        RetentionConfig.from_options(options)
