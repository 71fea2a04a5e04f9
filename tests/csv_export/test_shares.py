"""How a day's files are shared out among export jobs: bounded, complete, enough for every worker."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from csv_export.exporter import shares
from csv_export.jobs import SHARE_UNITS, CustomerFiles, Layout


@given(st.lists(st.integers(0, 3 * SHARE_UNITS), max_size=40), st.integers(1, 8))
def test_every_customer_is_in_one_share_and_shares_are_bounded(sizes: list[int], least: int) -> None:
    files = [CustomerFiles(f"C{i}", Layout(), tuple((f"U{i}-{k}", "") for k in range(n))) for i, n in enumerate(sizes)]
    out = shares(files, least)
    assert sorted(f.customer for share in out for f in share) == sorted(f.customer for f in files)
    for share in out:  # a customer above the bound is a share alone
        assert sum(len(f.units) for f in share) <= SHARE_UNITS or len(share) == 1
    assert len(out) >= min(least, len(files))
