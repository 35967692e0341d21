"""`sphere-fast bench-projection` end to end on a small shape."""
from __future__ import annotations

import re

import pytest

from sphere_fast.cli import main


@pytest.mark.parametrize("spectrum", ["steep", "gaussian"])
def test_bench_projection_reports_times_ratio_rank_and_error(spectrum, capsys):
    assert main(["bench-projection", "--shape", "96", "320", "--spectrum", spectrum]) == 0
    out = capsys.readouterr().out
    ours = re.search(r"sphere_fast sparse_projection\s+([\d.]+) s .* r = (\d+)", out)
    ref = re.search(r"reference sparse_projection\s+([\d.]+) s\s+r = (\d+)", out)
    ratio = re.search(r"speed-up\s+([\d.]+) x", out)
    err = re.search(r"float64 rank (\d+) .* = ([\d.e+-]+)", out)
    assert ours and ref and ratio and err, out
    assert ours.group(2) == ref.group(2) == err.group(1)  # one rank, three ways
    assert float(err.group(2)) <= 1e-5


def test_bench_projection_rejects_a_bad_spectrum(capsys):
    with pytest.raises(SystemExit):
        main(["bench-projection", "--spectrum", "bogus"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("args,says", [(["--eta", "0"], "eta must be in (0, 1]"), (["--alpha", "1.5"], "alpha must be"),
                                       (["--shape", "0", "8"], "--shape: expected a positive integer")])
def test_bench_projection_refuses_bad_numbers_before_running(args, says, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench-projection", *args])
    assert info.value.code == 2 and says in capsys.readouterr().err
