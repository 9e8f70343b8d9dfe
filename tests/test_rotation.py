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
    p.rotate(s)
    assert p.should_rotate(s) == (False, None)


def test_age_counts_from_last_rotation_and_fires_once_per_period(clock):
    s = establish_tenant_session(TenantIdentity("alice"), clock=clock)
    p = KeyRotationPolicy(max_age_seconds=300, clock=clock)
    clock.advance(299)
    assert p.should_rotate(s) == (False, None)
    clock.advance(1)
    assert p.should_rotate(s) == (True, RotationTrigger.TIME_ELAPSED)
    p.rotate(s)
    # the age restarts with each epoch, so the trigger fires once per period
    assert p.should_rotate(s) == (False, None)
    clock.advance(299)
    assert p.should_rotate(s) == (False, None)
    clock.advance(1)
    assert p.should_rotate(s)[0]


def test_rotate_returns_the_new_key_and_opens_the_next_epoch():
    s = establish_tenant_session(TenantIdentity("alice"))
    p = KeyRotationPolicy()
    old = s.symmetric_key
    key = p.rotate(s)
    assert len(key) == 32 and key != old and s.symmetric_key == key and s.epoch == 1
    assert p.rotate(s) == s.key_for_epoch(2)


def test_trigger_values_are_hyphenated_and_underscore_spellings_still_parse():
    assert [t.value for t in RotationTrigger] == ["entry-count", "time-elapsed", "manual"]
    assert RotationTrigger("entry_count") is RotationTrigger.ENTRY_COUNT
    assert RotationTrigger("time_elapsed") is RotationTrigger.TIME_ELAPSED
    with pytest.raises(ValueError):
        RotationTrigger("whenever")


@pytest.mark.parametrize("kwargs", [dict(max_entries=0), dict(max_age_seconds=0), dict(max_entries=10, hard_max_entries=5)])
def test_bad_policy_arguments(kwargs):
    with pytest.raises(ValueError):
        KeyRotationPolicy(**kwargs)
