from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyproviders import KeyProvider, ProviderConfigError, ProviderKeyNotFoundError, create_provider
from keyproviders.file import FileKeyProvider
from keyproviders.registry import available_providers
from keyproviders.testing import KeyProviderConformance


class TestFileProviderConformance(KeyProviderConformance):
    @pytest.fixture
    def provider(self, tmp_path: Path) -> Iterator[KeyProvider]:
        p = FileKeyProvider.create(tmp_path / "master.key")
        yield p
        p.close()

    @pytest.fixture
    def impostor(self, provider: KeyProvider, tmp_path: Path) -> Iterator[KeyProvider]:
        # The genuine file replaced by one an attacker made: same path, same configuration.
        FileKeyProvider.create(tmp_path / "planted.key")
        os.replace(tmp_path / "planted.key", tmp_path / "master.key")
        p = FileKeyProvider.load(tmp_path / "master.key")
        yield p
        p.close()


def test_created_key_file_is_owner_only(tmp_path: Path) -> None:
    FileKeyProvider.create(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_refuses_key_file_readable_by_group_or_others(tmp_path: Path, mode: int) -> None:
    FileKeyProvider.create(tmp_path / "k")
    os.chmod(tmp_path / "k", mode)
    with pytest.raises(ProviderConfigError, match="chmod 600"):
        FileKeyProvider.load(tmp_path / "k")


def test_missing_key_file_is_key_not_found(tmp_path: Path) -> None:
    with pytest.raises(ProviderKeyNotFoundError):
        FileKeyProvider.load(tmp_path / "absent")


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    FileKeyProvider.create(tmp_path / "k")
    with pytest.raises(ProviderConfigError, match="already exists"):
        FileKeyProvider.create(tmp_path / "k")


def test_rotation_persists_all_versions(tmp_path: Path) -> None:
    p = FileKeyProvider.create(tmp_path / "k")
    wrapped = p.wrap(b"k" * 32, b"aad")
    new_id = p.rotate()
    again = FileKeyProvider.load(tmp_path / "k")
    assert again.key_id() == new_id
    assert again.unwrap(wrapped, b"aad") == b"k" * 32
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600


def test_garbage_key_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text(json.dumps({"format": 1, "keys": [{"key": "not base64!"}], "active": "x"}))
    path.chmod(0o600)
    with pytest.raises(ProviderConfigError, match="not a secretsd key file"):
        FileKeyProvider.load(path)


def test_registry_finds_built_in_providers_by_name(tmp_path: Path) -> None:
    assert {"file", "pkcs11"} <= set(available_providers())
    p = create_provider({"kind": "file", "path": "m.key"}, base_dir=tmp_path, create=True)
    assert isinstance(p, FileKeyProvider)
    assert p.path == tmp_path / "m.key"


def test_registry_never_guesses(tmp_path: Path) -> None:
    with pytest.raises(ProviderConfigError, match="unknown key provider kind 'fil'"):
        create_provider({"kind": "fil"}, base_dir=tmp_path)
    with pytest.raises(ProviderConfigError, match="kind must name a provider"):
        create_provider({"path": "m.key"}, base_dir=tmp_path)


def test_unknown_option_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProviderConfigError, match="unknown option"):
        create_provider({"kind": "file", "pth": "m.key"}, base_dir=tmp_path)


def test_refresh_picks_up_a_rotation_made_by_another_process(tmp_path: Path) -> None:
    mine = FileKeyProvider.create(tmp_path / "k")
    theirs = FileKeyProvider.load(tmp_path / "k")
    new_id = theirs.rotate()
    assert mine.key_id() != new_id
    mine.refresh()
    assert mine.key_id() == new_id
    assert mine.wrap(b"k" * 32, b"a").key_id == new_id
