"""Assertions shared by the tests that run the entry scripts as a user does."""

from __future__ import annotations


def assert_one_line_exit_2(r, *needles: str) -> None:
    """A user error as the standards want it: exit 2, no traceback, one `error: ...` line on
    stderr naming each of `needles`."""
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)
