"""A unit's day of health from its telegrams: what each number of the record says (pure, no store)."""

from __future__ import annotations

import msgspec

from kernel.reading import Diag
from monitoring.health import RECORD, SEQ_WRAP, day_records, records_frame, rows_frame

DAY = 1_795_000_000 - 1_795_000_000 % 86400
SLOT = 1800
blob = msgspec.json.encode  # as ingest keeps a `diag`: JSON, as the unit sent it


def test_a_units_day_says_its_gaps_restarts_delays_clock_signal_reboots_and_supply() -> None:
    rows = []
    seq = 100
    for k in range(1, 49):
        at = DAY + k * SLOT
        if k in (10, 11):  # two telegrams the unit sent and smame never got
            seq += 1
            continue
        if k == 30:  # it rebooted: its counter starts again
            seq = 0
        diag = Diag(fw="2.1.0", rsrp=-90 - (k % 3), sinr=5.0, ce=1, boot=7 if k < 30 else 8, vsup=3300 - k, att=1)
        rows.append(("A", at, seq, at + 20 - 5, at + 20, k == 40, blob(diag) if k % 2 else None))
        seq += 1
    # B: a backlog of four readings in one telegram, its clock a minute fast, no diag, one diag field dropped
    late = DAY + 20 * SLOT + 600  # received 10 minutes after its newest reading: the older two are late
    rows += [("B", DAY + k * SLOT, 5, late + 60, late, False, None) for k in range(17, 20)]
    rows.append(("B", DAY + 20 * SLOT, 5, late + 60, late, False, b'{"rsrp":-101,"vsup":-1,"ce":"1"}'))
    records = {r["unit"]: r for r in day_records(rows_frame(rows), {"B": 3, "C": 1}).to_dicts()}
    a, b, c = records["A"], records["B"], records["C"]
    assert (a["readings"], a["late"], a["seq_gaps"], a["restarts"], a["no_data"]) == (46, 0, 2, 1, 1)
    assert (a["delay_p50"], a["delay_max"], a["clock_offset"]) == (20, 20, -5)
    assert (a["rsrp"], a["rsrp_min"], a["sinr"], a["ce"], a["reboots"], a["attaches"]) == (-91.0, -92, 5.0, 1, 1, 23)
    assert (a["vsup_min"], a["fw"], a["disconnects"], a["diag_dropped"]) == (3300 - 47, "2.1.0", 0, 0)
    assert (b["readings"], b["late"], b["delay_p50"], b["clock_offset"], b["seq_gaps"]) == (4, 2, 600, 60, 0)
    assert (b["rsrp"], b["reboots"], b["diag_dropped"], b["disconnects"]) == (-101.0, None, 2, 3)  # no boot: unknown
    assert (c["readings"], c["disconnects"], c["rsrp"]) == (0, 1, None)  # heard of only by its status topic


def test_a_counter_that_wraps_is_no_restart() -> None:
    rows = [
        ("W", DAY + k * SLOT, (SEQ_WRAP - 2 + k) % SEQ_WRAP, DAY + k * SLOT, DAY + k * SLOT, False, None)
        for k in range(1, 5)
    ]
    rows.append(("W", DAY + 6 * SLOT, 4, DAY + 6 * SLOT, DAY + 6 * SLOT, False, None))  # seq 3 never came
    [w] = day_records(rows_frame(rows), {}).to_dicts()
    assert (w["restarts"], w["seq_gaps"]) == (0, 1)


def test_a_fall_from_high_that_is_no_wrap_is_a_restart_and_loses_nothing() -> None:
    # a unit whose counter stood at three billion reboots and counts from 0: not four billion lost telegrams
    seqs = [3_000_000_000, 3_000_000_001, 0, 1, 2]
    rows = [("R", DAY + k * SLOT, seq, DAY + k * SLOT, DAY + k * SLOT, False, None) for k, seq in enumerate(seqs, 1)]
    [r] = day_records(rows_frame(rows), {}).to_dicts()
    assert (r["restarts"], r["seq_gaps"]) == (1, 0)


def test_telegrams_received_in_one_second_are_taken_in_the_order_the_unit_sent_them() -> None:
    # a backlog after a reboot, all received in one second: sent 5, 6, then (rebooted) 0, 1
    sent = {5: 100, 6: 200, 0: 300, 1: 400}
    rows = [("B", DAY + k * SLOT, seq, DAY + t, DAY + 999, False, None) for k, (seq, t) in enumerate(sent.items(), 1)]
    [b] = day_records(rows_frame(rows), {}).to_dicts()
    assert (b["restarts"], b["seq_gaps"]) == (1, 0)


def test_records_read_a_batch_at_a_time_make_the_same_frame() -> None:
    rows = [(86400 * d, f"U{u}", *(None if name == "fw" else 0 for name in RECORD)) for d in range(2) for u in range(3)]
    rows = [(*r[:-4], "2.1.0", f"c{k}", 0, k) for k, r in enumerate(rows)]
    whole = records_frame(rows, batch=len(rows))
    assert records_frame(iter(rows), batch=4).equals(whole)
    assert records_frame([(0, "U1", -90.0)], ["rsrp"]).columns == ["day", "unit", "rsrp"]
    assert whole.height == 6 and whole["disconnects"].to_list() == list(range(6))
    assert records_frame(iter([])).height == 0
