"""Settings: defaults < config.toml < WIZARDCHAT_* environment < flags, validated once."""

from __future__ import annotations

from pathlib import Path

import pytest

from wizardchat.errors import UsageError
from wizardchat.settings import DEFAULT_SYSTEM_PROMPT, load_settings


def test_defaults(tmp_path: Path) -> None:
    s = load_settings({}, config_path=tmp_path / "none.toml", environ={})
    assert s.model is None and s.ctx_size == 0 and s.system == DEFAULT_SYSTEM_PROMPT
    assert s.flash_attn == "auto" and s.mmap and not s.cpu_moe


def test_precedence_config_then_env_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('model = "/from/config.gguf"\nctx-size = 1000\ntemperature = 0.1\ntop_k = 5\n')
    env = {"WIZARDCHAT_CTX_SIZE": "2000", "WIZARDCHAT_TEMPERATURE": "0.2"}
    s = load_settings({"temperature": 0.3, "top_k": None}, config_path=cfg, environ=env)
    assert (s.model, s.ctx_size, s.temperature, s.top_k) == ("/from/config.gguf", 2000, 0.3, 5)


def test_env_lists_and_booleans(tmp_path: Path) -> None:
    env = {"WIZARDCHAT_OVERRIDE_TENSOR": "exps=CPU, blk\\.0\\.=CPU", "WIZARDCHAT_CPU_MOE": "yes"}
    s = load_settings({}, config_path=tmp_path / "none.toml", environ=env)
    assert s.override_tensor == ("exps=CPU", "blk\\.0\\.=CPU") and s.cpu_moe


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nonsense = 1\n", "unknown setting 'nonsense'"),
        ("ctx_size = 'big'\n", "ctx_size: 'big' is not a whole number"),
        ("ctx_size = \n", "config file"),
        ("cache_type_v = 'q9'\n", "cache_type_v: must be one of"),
    ],
)
def test_bad_config_is_one_clear_usage_error(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_settings({}, config_path=cfg, environ={})


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="WIZARDCHAT_THREADS"):
        load_settings({}, config_path=tmp_path / "none.toml", environ={"WIZARDCHAT_THREADS": "x"})


def test_home_relocates_every_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from wizardchat import paths

    monkeypatch.setenv("WIZARDCHAT_HOME", str(tmp_path))
    for d in (paths.config_dir(), paths.data_dir(), paths.log_dir()):
        assert d.is_relative_to(tmp_path)
