"""Toy-world build profiles: the smoke profile gets its own cache folder and cheaper settings."""

import pytest

from distill.toy import cache


def test_profiles_select_folder_and_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("UNITOWER_CACHE", str(tmp_path / "toy"))
    monkeypatch.delenv("UNITOWER_TOY_PROFILE", raising=False)
    assert cache.default_cache_dir() == tmp_path / "toy"
    monkeypatch.setenv("UNITOWER_TOY_PROFILE", "smoke")
    assert cache.default_cache_dir() == tmp_path / "toy-smoke"
    smoke, default = cache.PROFILES["smoke"], cache.PROFILES["default"]
    assert smoke.digest() != default.digest() and smoke.clip_steps < default.clip_steps


def test_unknown_profile_is_named(monkeypatch):
    monkeypatch.setenv("UNITOWER_TOY_PROFILE", "huge")
    with pytest.raises(ValueError, match="UNITOWER_TOY_PROFILE='huge'"):
        cache.default_cache_dir()
