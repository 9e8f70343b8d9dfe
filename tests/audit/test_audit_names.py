"""names.py on its own: dense tables, labels for unknown indices, pending entries for the file."""

import threading

import pytest

from pqc_kv_cache.audit.names import SESSION, TENANT, DetailTexts, NameTable


def test_indices_are_dense_and_stable_and_pending_entries_come_in_order():
    names = NameTable(threading.Lock(), persist=True)
    assert names.tenant_index("a") == 0 and names.tenant_index("b") == 1 and names.tenant_index("a") == 0
    assert names.session_index("s", "b") == 0 and names.session_index("s", "a") == 1
    assert names.session_index("s", "b") == 0
    assert names.take_pending() == [(TENANT, 0, 0, "a"), (TENANT, 1, 0, "b"), (SESSION, 0, 1, "s"),
                                    (SESSION, 1, 0, "s")]
    assert names.take_pending() == []
    assert names.find_tenant("b") == 1 and names.find_tenant("c") is None
    assert names.tenant_id(1) == "b" and names.tenant_id(2) is None and names.tenant_id(-1) is None


def test_labels_name_unknown_indices_by_number():
    names = NameTable(threading.Lock())
    names.session_index("s", "a")
    assert names.tenant_label(0) == "a" and names.session_label(0) == "s"
    assert names.tenant_label(7) == "#7" and names.session_label(3) == "#3"
    assert names.take_pending() == []            # not persisted: nothing kept for a file


def test_a_bad_session_id_registers_neither_id():
    names = NameTable(threading.Lock(), persist=True)
    with pytest.raises(ValueError, match="session_id"):
        names.session_index("x" * 70_000, "t")
    with pytest.raises(TypeError, match="session_id"):
        names.session_index(5, "t")
    assert names.find_tenant("t") is None and names.take_pending() == []


def test_load_continues_a_table_and_reports_gaps():
    names = NameTable(threading.Lock(), persist=True)
    assert names.load({0: "a", 1: "b"}, {0: (1, "s")})
    assert names.tenant_index("c") == 2 and names.session_index("s", "b") == 0
    assert names.take_pending() == [(TENANT, 2, 0, "c")]
    assert not NameTable(threading.Lock()).load({0: "a", 2: "c"}, {})


def test_details_are_kept_pending_and_forgotten_with_their_records():
    details = DetailTexts(persist=True)
    details.check("ok")
    with pytest.raises(TypeError):
        details.check(3)
    details.add(2, "two")                        # added in record-number order, as the log numbers them
    details.add(5, "five")
    assert details.take_pending() == [(2, "two"), (5, "five")] and details.take_pending() == []
    assert details.get(5) == "five" and 2 in details
    details.forget_before(3)
    assert 2 not in details and details.get(5) == "five" and details.get(2, "") == ""
