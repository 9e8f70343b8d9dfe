"""Sessions that outlive their process: a sealed export under a key file, and a rebuild from the tenant's key.

A resumed or imported session opens what the original sealed and never seals under a (key, nonce) pair
another session may have used; across a real process boundary too."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pqc_kv_cache.errors import SessionExpiredError, SessionExportError
from pqc_kv_cache.resumption import (
    KEK_FILE_SIZE,
    export_session,
    generate_kek_file,
    import_session,
    load_kek_file,
    resume_session,
)
from pqc_kv_cache.session import TenantIdentity, TenantKeyPair, establish_tenant_session

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def kek(tmp_path):
    path = tmp_path / "keys" / "session.kek"
    generate_kek_file(path)
    return path


def sealed_pairs(session, n=3):
    """(key, epoch, counter) of ``n`` counters the session hands out now."""
    epoch, first = session.reserve(n)
    key = session.key_for_epoch(epoch)
    return {(key, epoch, first + i) for i in range(n)}


# ---- the key file -------------------------------------------------------------------------------------
def test_key_file_is_owner_only_and_never_overwritten(kek):
    assert stat.S_IMODE(os.stat(kek).st_mode) == 0o600
    assert os.path.getsize(kek) == KEK_FILE_SIZE
    before = open(kek, "rb").read()
    with pytest.raises(SessionExportError, match="never overwritten"):
        generate_kek_file(kek)
    assert open(kek, "rb").read() == before


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_key_file_readable_by_others_is_refused(kek):
    os.chmod(kek, 0o640)
    with pytest.raises(SessionExportError, match="group or others"):
        load_kek_file(kek)
    with pytest.raises(SessionExportError):
        export_session(establish_tenant_session(TenantIdentity("alice")), kek)


def test_key_file_of_wrong_size_or_missing_is_refused(tmp_path, kek):
    bad = tmp_path / "bad.kek"
    bad.write_bytes(open(kek, "rb").read() + b"\0")
    os.chmod(bad, 0o600)
    with pytest.raises(SessionExportError, match="not a session key-encryption key file"):
        load_kek_file(bad)
    with pytest.raises(SessionExportError, match="does not exist"):
        load_kek_file(tmp_path / "missing.kek")
    with pytest.raises(SessionExportError):
        load_kek_file(tmp_path)          # a directory


# ---- export and import ---------------------------------------------------------------------------------
def test_imported_session_opens_old_epochs_and_seals_under_its_own_branch(kek):
    s = establish_tenant_session(TenantIdentity("alice"))
    used = sealed_pairs(s, 5)
    s.rotate_key()
    used |= sealed_pairs(s, 5)
    blob = export_session(s, kek)
    imported = import_session(blob, kek)
    assert (imported.tenant_id, imported.session_id, imported.kem_ciphertext) == \
           (s.tenant_id, s.session_id, s.kem_ciphertext)
    assert imported.key_for_epoch(0) == s.key_for_epoch(0) and imported.key_for_epoch(1) == s.key_for_epoch(1)
    assert imported.owns_epoch is False and s.owns_epoch is True
    assert abs(imported._deadline - imported._created - (s._deadline - s._created)) < 5
    # the original goes on sealing, rotating too; the import (twice) seals on branches of its own
    again = import_session(blob, kek)
    mine = sealed_pairs(imported, 5)
    assert imported.epoch == 2 and 2 in imported.branches
    theirs = sealed_pairs(again, 5)
    s.rotate_key()
    later = sealed_pairs(s, 5)
    assert s.epoch == imported.epoch == again.epoch == 2      # the same epoch number, three keys
    keys = {s.key_for_epoch(2), imported.key_for_epoch(2), again.key_for_epoch(2)}
    assert len(keys) == 3
    pairs = [used, mine, theirs, later]
    assert sum(map(len, pairs)) == len(set().union(*pairs))


def test_export_under_another_key_or_changed_is_refused(tmp_path, kek):
    s = establish_tenant_session(TenantIdentity("alice"))
    blob = export_session(s, kek)
    other = tmp_path / "other.kek"
    generate_kek_file(other)
    with pytest.raises(SessionExportError, match="does not verify"):
        import_session(blob, other)
    for i in list(range(0, len(blob), 7)) + [len(blob) - 1]:
        bad = bytearray(blob)
        bad[i] ^= 0x04
        with pytest.raises(SessionExportError):
            import_session(bytes(bad), kek)
    for cut in (0, 10, 44, len(blob) - 1):
        with pytest.raises(SessionExportError):
            import_session(blob[:cut], kek)
    with pytest.raises(SessionExportError):
        import_session(blob + b"\0", kek)
    with pytest.raises(TypeError):
        import_session("not bytes", kek)


def test_expired_session_cannot_be_exported_or_imported(kek, clock):
    s = establish_tenant_session(TenantIdentity("alice"), ttl_seconds=60, clock=clock)
    blob = export_session(s, kek)
    s.expires_at = "2000-01-01T00:00:00+00:00"
    with pytest.raises(SessionExpiredError):
        export_session(s, kek)
    assert import_session(blob, kek).is_valid()      # exported while valid, and still within its TTL


def test_import_after_the_exported_expiry_is_refused(kek, clock, monkeypatch):
    s = establish_tenant_session(TenantIdentity("alice"), ttl_seconds=60, clock=clock)
    blob = export_session(s, kek)
    import time as time_mod
    real = time_mod.time
    monkeypatch.setattr(time_mod, "time", lambda: real() + 61)
    with pytest.raises(SessionExpiredError):
        import_session(blob, kek)


# ---- the tenant's key ----------------------------------------------------------------------------------
def test_resumed_from_tenant_key_pair_opens_epoch_0_and_branches_before_sealing():
    kp = TenantKeyPair.generate("alice")
    s = establish_tenant_session(kp.identity())
    used = sealed_pairs(s, 4)
    r = resume_session(kp, "alice", s.session_id, s.kem_ciphertext)
    assert r.key_for_epoch(0) == s.key_for_epoch(0)
    mine = sealed_pairs(r, 4)
    assert not used & mine and r.epoch == 1
    # the tenant derives the branch epoch's key with the branch points the session publishes
    assert kp.session_key(s.kem_ciphertext, s.session_id, 1, branches=r.branches) == r.key_for_epoch(1)
    assert kp.session_key(s.kem_ciphertext, s.session_id, 1) != r.key_for_epoch(1)
    assert r.to_public_dict()["branches"] == {"1": r.branches[1].hex()}
    with pytest.raises(ValueError):
        resume_session(TenantKeyPair.generate("bob"), "alice", s.session_id, s.kem_ciphertext)


# ---- across a real process boundary --------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from pqc_kv_cache.cache import EncryptedCache
    from pqc_kv_cache.resumption import export_session, generate_kek_file
    from pqc_kv_cache.session import TenantKeyPair, establish_tenant_session
    from support.cache_models import tiny_model
    from cryptography.hazmat.primitives.asymmetric import mlkem

    out = sys.argv[1]
    kp = TenantKeyPair(mlkem.MLKEM768PrivateKey.from_seed_bytes(bytes.fromhex(sys.argv[2])), "alice")
    s = establish_tenant_session(kp.identity())
    cache = EncryptedCache(tiny_model("llama").config, sessions=[s], merge_min_segments=2)
    g = torch.Generator().manual_seed(5)
    ks, vs = [], []
    for n in (5, 1, 1, 1, 1, 1, 1):
        k, v = torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g)
        for layer in range(2):
            cache.update(k, v, layer)
        ks.append(k); vs.append(v)
    cache.crop(-3)                    # counters of the dropped chunks were used
    cache.save(out + "/cache.pkvf")
    generate_kek_file(out + "/session.kek")
    open(out + "/session.export", "wb").write(export_session(s, out + "/session.kek"))
    torch.save({"k": torch.cat(ks, 2)[:, :, :-3], "v": torch.cat(vs, 2)[:, :, :-3]}, out + "/kv.pt")
    json.dump({"session_id": s.session_id, "kem": s.kem_ciphertext.hex(), "epoch": s.epoch,
               "next_sequence": s.next_sequence, "key0": s.key_for_epoch(0).hex()}, open(out + "/facts.json", "w"))
""")


def test_session_resumes_in_another_process(tmp_path):
    import torch
    from cryptography.hazmat.primitives.asymmetric import mlkem

    from pqc_kv_cache.cache import EncryptedCache
    from support.cache_models import tiny_model

    seed = os.urandom(64)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), seed.hex()], check=True, env=env, cwd=tmp_path,
                   timeout=300)
    facts = json.load(open(tmp_path / "facts.json"))
    want = torch.load(tmp_path / "kv.pt")
    blob = (tmp_path / "session.export").read_bytes()

    def continued(session):
        cache = EncryptedCache.load(tmp_path / "cache.pkvf", tiny_model("llama").config, [session],
                                    merge_min_segments=2)
        g = torch.Generator().manual_seed(9)
        k, v = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)
        k_out, v_out = cache.update(k, v, 0)
        assert torch.equal(k_out, torch.cat([want["k"], k], 2)) and torch.equal(v_out, torch.cat([want["v"], v], 2))
        epoch = session.epoch
        return session.key_for_epoch(epoch), epoch

    imported = import_session(blob, tmp_path / "session.kek")
    assert imported.key_for_epoch(0).hex() == facts["key0"]
    kp = TenantKeyPair(mlkem.MLKEM768PrivateKey.from_seed_bytes(seed), "alice")
    resumed = resume_session(kp, "alice", facts["session_id"], bytes.fromhex(facts["kem"]))
    a, b = continued(imported), continued(resumed)
    # both sealed the new position under a branch epoch past the one the child sealed in: three keys
    assert a[1] == b[1] == facts["epoch"] + 1
    assert len({a[0], b[0], bytes.fromhex(facts["key0"])}) == 3
