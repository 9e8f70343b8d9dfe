import pytest

from pqc_kv_cache import KeyRotationPolicy, RotationTrigger, TenantIdentity, establish_tenant_session


def test_defaults_match_the_earlier_library():
    p = KeyRotationPolicy()
    assert (p.max_entries, p.max_age_seconds) == (100_000, 300)
    assert {t.name for t in RotationTrigger} == {"ENTRY_COUNT", "TIME_ELAPSED", "MANUAL"}


def test_entry_count_trigger():
    s = establish_tenant_session(TenantIdentity("alice"))
    p = KeyRotationPolicy(max_entries=10)
    s.reserve(9)
    assert p.should_rotate(s) == (False, None)
    s.reserve(1)
    assert p.should_rotate(s) == (True, RotationTrigger.ENTRY_COUNT)
    p.rotate(s, RotationTrigger.ENTRY_COUNT)
    assert p.should_rotate(s) == (False, None)


def test_age_counts_from_last_rotation_and_fires_once_per_period(clock):
    s = establish_tenant_session(TenantIdentity("alice"), clock=clock)
    p = KeyRotationPolicy(max_age_seconds=300, clock=clock)
    clock.advance(299)
    assert p.should_rotate(s) == (False, None)
    clock.advance(1)
    assert p.should_rotate(s) == (True, RotationTrigger.TIME_ELAPSED)
    p.rotate(s, RotationTrigger.TIME_ELAPSED)
    # the earlier library fired forever after the first period; here the age restarts
    assert p.should_rotate(s) == (False, None)
    clock.advance(299)
    assert p.should_rotate(s) == (False, None)
    clock.advance(1)
    assert p.should_rotate(s)[0]


def test_rotate_returns_new_epoch_and_accepts_trigger_strings():
    s = establish_tenant_session(TenantIdentity("alice"))
    p = KeyRotationPolicy()
    assert p.rotate(s) == 1
    assert p.rotate(s, "manual") == 2
    with pytest.raises(ValueError):
        p.rotate(s, "whenever")


@pytest.mark.parametrize("kwargs", [dict(max_entries=0), dict(max_age_seconds=0), dict(max_entries=10, hard_max_entries=5)])
def test_bad_policy_arguments(kwargs):
    with pytest.raises(ValueError):
        KeyRotationPolicy(**kwargs)
