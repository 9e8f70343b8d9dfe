"""The gateway's session vault: tenants' sessions sealed on disk under a KEK, resumed onto a branch epoch of
their own, saved before a worker learns a new epoch, and gone once closed."""

from __future__ import annotations

import os
import time

import pytest

from pqc_kv_cache.isolation import TenantIsolationManager
from pqc_kv_cache.resumption import generate_kek_file
from pqc_kv_cache.session import TenantKeyPair
from pqc_kv_cache.vllm import KeyClient, KeyService, KeyServiceError
from pqc_kv_cache.vllm.sessionvault import SessionVault, SessionVaultError


@pytest.fixture()
def kek(tmp_path):
    path = tmp_path / "secrets" / "sessions.kek"
    generate_kek_file(path)
    return str(path)


def _session(manager, tenant="tenant-a", **kw):
    return manager.create_session(TenantKeyPair.generate(tenant).identity(), **kw)


def test_a_restored_session_holds_the_earlier_keys_and_seals_on_a_branch_epoch(tmp_path, kek):
    vault = SessionVault(str(tmp_path / "vault"), kek)
    m1 = TenantIsolationManager()
    s1 = vault.keep(_session(m1))
    assert oct(os.stat(vault.path_of("tenant-a")).st_mode & 0o777) == "0o600"
    key0 = s1.key_for_epoch(0)
    m2 = TenantIsolationManager()
    (s2,) = SessionVault(str(tmp_path / "vault"), kek).restore(m2)
    assert m2.get_session("tenant-a") is s2 and s2.session_id == s1.session_id
    assert s2.key_for_epoch(0) == key0                        # what was sealed before opens
    assert s2.epoch == 1 and s2.owns_epoch and s2.key_for_epoch(1) not in (key0, s1.key_for_epoch(0))
    # the restart's own epoch is on disk before anything is served: a second restart knows it
    m3 = TenantIsolationManager()
    (s3,) = SessionVault(str(tmp_path / "vault"), kek).restore(m3)
    assert s3.key_for_epoch(1) == s2.key_for_epoch(1) and s3.epoch == 2


def test_keep_writes_only_when_the_epoch_or_live_keys_change(tmp_path, kek):
    vault = SessionVault(str(tmp_path / "vault"), kek)
    m = TenantIsolationManager()
    s = vault.keep(_session(m))
    ino = os.stat(vault.path_of("tenant-a")).st_ino
    vault.keep(s)
    assert os.stat(vault.path_of("tenant-a")).st_ino == ino   # written again only on a change (a rename)
    m.rotate("tenant-a")
    vault.keep(s)
    ino2 = os.stat(vault.path_of("tenant-a")).st_ino
    assert ino2 != ino
    s.retire_epoch(0)
    vault.keep(s)
    assert os.stat(vault.path_of("tenant-a")).st_ino != ino2
    (r,) = SessionVault(str(tmp_path / "vault"), kek).restore(TenantIsolationManager())
    assert r.live_epochs == [1, 2]                             # a retired epoch does not come back


def test_a_closed_session_is_not_resumed(tmp_path, kek):
    vault = SessionVault(str(tmp_path / "vault"), kek)
    m = TenantIsolationManager()
    vault.keep(_session(m, "tenant-a"))
    vault.keep(_session(m, "tenant-b"))
    m.close_session("tenant-a")
    assert not os.path.exists(vault.path_of("tenant-a"))
    restored = SessionVault(str(tmp_path / "vault"), kek).restore(TenantIsolationManager())
    assert [s.tenant_id for s in restored] == ["tenant-b"]


def test_an_expired_session_is_dropped_and_a_new_one_replaces_its_file(tmp_path, kek):
    vault = SessionVault(str(tmp_path / "vault"), kek)
    m = TenantIsolationManager()
    vault.keep(_session(m, ttl_seconds=0.2))
    vault.keep(_session(m, "tenant-b"))
    time.sleep(0.3)
    restored = SessionVault(str(tmp_path / "vault"), kek).restore(TenantIsolationManager())
    assert [s.tenant_id for s in restored] == ["tenant-b"]
    assert not os.path.exists(vault.path_of("tenant-a"))


def test_a_vault_under_another_kek_or_a_changed_file_fails_the_restore(tmp_path, kek):
    vault = SessionVault(str(tmp_path / "vault"), kek)
    vault.keep(_session(TenantIsolationManager()))
    other = tmp_path / "other.kek"
    generate_kek_file(other)
    with pytest.raises(SessionVaultError, match="does not verify"):
        SessionVault(str(tmp_path / "vault"), str(other)).restore(TenantIsolationManager())
    path = vault.path_of("tenant-a")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 1
    open(path, "wb").write(bytes(data))
    m = TenantIsolationManager()
    with pytest.raises(SessionVaultError, match="does not verify"):
        SessionVault(str(tmp_path / "vault"), kek).restore(m)
    assert m.list_active_tenants() == []


def test_a_file_renamed_to_another_tenant_is_refused(tmp_path, kek):
    vault = SessionVault(str(tmp_path / "vault"), kek)
    vault.keep(_session(TenantIsolationManager()))
    os.rename(vault.path_of("tenant-a"), vault.path_of("tenant-b"))
    with pytest.raises(SessionVaultError, match="whose file it is not"):
        SessionVault(str(tmp_path / "vault"), kek).restore(TenantIsolationManager())


def test_a_kek_inside_the_vault_a_loose_kek_or_an_open_directory_is_refused(tmp_path, kek):
    inside = tmp_path / "vault" / "k.kek"
    generate_kek_file(inside)
    with pytest.raises(SessionVaultError, match="must not be kept"):
        SessionVault(str(tmp_path / "vault"), str(inside))
    os.chmod(kek, 0o644)
    with pytest.raises(SessionVaultError, match="group or others"):
        SessionVault(str(tmp_path / "v2"), kek)
    os.chmod(kek, 0o600)
    (tmp_path / "open").mkdir(mode=0o755)
    os.chmod(tmp_path / "open", 0o755)
    with pytest.raises(SessionVaultError, match="mode 0700"):
        SessionVault(str(tmp_path / "open"), kek)


def test_a_new_epoch_is_not_served_when_it_cannot_be_saved(tmp_path, kek):
    SessionVault(str(tmp_path / "vault"), kek).keep(_session(TenantIsolationManager()))
    m = TenantIsolationManager()
    vault = SessionVault(str(tmp_path / "vault"), kek)        # the restarted gateway's
    (s,) = vault.restore(m)
    with KeyService(m, str(tmp_path / "keys"), keep=vault.keep) as service:
        client = KeyClient(service.path)
        assert client.reserve("tenant-a", s.session_id, 1).epoch == 1     # the restore's epoch, saved already
        m.rotate("tenant-a")                                   # a new epoch the file does not know yet
        os.unlink(vault.path_of("tenant-a"))
        os.mkdir(vault.path_of("tenant-a"))                    # the save's rename fails
        with pytest.raises(KeyServiceError, match="cannot save the session"):
            client.reserve("tenant-a", s.session_id, 1)


def test_a_closed_session_is_never_written(tmp_path, kek):
    from pqc_kv_cache.errors import KVCacheError
    vault = SessionVault(str(tmp_path / "vault"), kek)
    m = TenantIsolationManager()
    s = _session(m)
    m.close_session("tenant-a")
    with pytest.raises(KVCacheError):
        vault.keep(s)
    assert not os.path.exists(vault.path_of("tenant-a"))
