"""Settings: the GPUQ_ prefix, the .env file, masking, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.settings import Settings, mask_url


@pytest.fixture(autouse=True)
def _no_gpuq_environment(monkeypatch):
    """These tests set what they read; CI's GPUQ_REDIS_URL and friends must not leak in."""
    import os

    for name in [n for n in os.environ if n.startswith("GPUQ_")]:
        monkeypatch.delenv(name)


def test_settings_read_prefixed_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("GPUQ_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("GPUQ_FAKE_GPUS", "3")
    monkeypatch.setenv("GPUQ_HOSTNAME", "node-7")
    s = Settings(_env_file=None)
    assert (s.home, s.fake_gpus, s.hostname) == (tmp_path / "h", 3, "node-7")
    assert s.effective_database_url() == f"sqlite:///{tmp_path / 'h' / 'gpuq.db'}"


def test_settings_read_a_dotenv_file(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    Path(".env").write_text("GPUQ_FAKE_GPUS=5\nGPUQ_REDIS_URL=redis://127.0.0.1:6390/0\n")
    s = Settings()
    assert s.fake_gpus == 5
    assert s.redis_url == "redis://127.0.0.1:6390/0"


def test_home_is_made_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert Settings(_env_file=None).home == tmp_path / ".gpuq"


def test_passwords_are_masked():
    s = Settings(redis_url="redis://user:hunter2@host:6379/0",
                 database_url="postgresql://gpuq:s3cret@db/gpuq", _env_file=None)
    shown = s.masked()
    assert "hunter2" not in str(shown) and "s3cret" not in str(shown)
    assert shown["redis_url"] == "redis://user:****@host:6379/0"
    assert mask_url("redis://host:6379") == "redis://host:6379"


@pytest.mark.parametrize(("name", "value", "fix"), [
    ("GPUQ_FAKE_GPUS", "-1", "fake_gpus"),
    ("GPUQ_HOSTNAME", "bad host!", "GPUQ_HOSTNAME may hold only"),
    ("GPUQ_TRANSPORT", "carrier-pigeon", "'local', 'remote' or 'http'"),
])
def test_bad_settings_name_the_variable(monkeypatch, name, value, fix):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=fix):
        Settings(_env_file=None)


def test_env_example_documents_every_setting():
    from tests.support.servers import ROOT

    text = (ROOT / "deploy" / ".env.example").read_text()
    missing = [name for name in Settings.model_fields if f"GPUQ_{name.upper()}=" not in text]
    assert missing == []

