"""The work plan: hostfile syntax, rank weights and the largest-remainder split."""

import os
import random
import re

import pytest

from mpicorr import plan
from mpicorr.errors import UserError


def test_parse_both_syntaxes():
    text = ("# comment weight=9\ngpu01.example.org slots=2 weight=3\n\ngpu02 slots=1  # trailing\nold 48\n"
            "gpu03 slots=2 max_slots=4 # weight=2.5 (mpirun ignores comments)\n")
    lines = plan.parse_hostfile(text)
    assert lines == [plan.HostLine("gpu01.example.org", 2, 3.0), plan.HostLine("gpu02", 1, 1.0),
                     plan.HostLine("old", 1, 48.0), plan.HostLine("gpu03", 2, 2.5)]


@pytest.mark.parametrize("text", ["a slots=0", "a weight=-1", "a slots=x", "a bogus=1", "a 0", "# nothing\n",
                                  "a weight=1e400", "a weight=1e308\nb weight=1e308", "a 1e308",
                                  "a slots=100000000000"])
def test_bad_hostfiles(text):
    with pytest.raises(UserError, match="hostfile"):
        plan.parse_hostfile(text)


def test_rank_weights_by_host_and_slot_order():
    lines = plan.parse_hostfile("n1 slots=2 weight=2\nn2.cluster slots=1 weight=5\nlocalhost slots=1\n")
    hosts = ["head", "n1.cluster", "n2", "n1"]
    assert plan.rank_weights(lines, hosts) == [1.0, 2.0, 5.0, 2.0]


def test_rank_weights_errors():
    lines = plan.parse_hostfile("n1 slots=1\n")
    with pytest.raises(UserError, match="no line for host 'n2'"):
        plan.rank_weights(lines, ["n1", "n2"])
    with pytest.raises(UserError, match="1 slot"):
        plan.rank_weights(lines, ["n1", "n1"])


def test_a_line_without_slots_takes_any_number_of_ranks():
    lines = plan.parse_hostfile("n1 slots=1 # weight=3\nn2 # weight=2\nn3\n")
    assert plan.rank_weights(lines, ["n2"] * 7 + ["n1", "n3"]) == [2.0] * 7 + [3.0, 1.0]
    assert [line.host for line, _ in plan.by_slot(lines, 5)] == ["n1", "n2", "n2", "n2", "n2"]


def test_example_hostfile_runs_any_number_of_ranks_here_and_its_examples_parse():
    """The hostfile in the repository root, read by default there: `mpirun -n 3` on this machine works with
    equal weights; the commented cluster lines, uncommented, give the weights they describe."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hostfile")
    text = open(path, encoding="utf-8").read()
    lines = plan.parse_hostfile(text, path)
    assert plan.rank_weights(lines, ["thishost"] * 3, path) == [1.0, 1.0, 1.0]
    assert [line.host for line, _ in plan.by_slot(lines, 3, path)] == ["localhost"] * 3
    examples = "\n".join(m.group(1) for m in re.finditer(r"^#\s+(gpu\S* slots=.*)$", text, re.M))
    assert plan.rank_weights(plan.parse_hostfile(examples), ["gpu01"] * 4 + ["gpu02"] * 2) == [2.0] * 4 + [1.0] * 2


def test_split_exact_examples():
    assert plan.split(10, [1, 1, 1]) == [(0, 4), (4, 7), (7, 10)]
    assert plan.split(7, [3, 1]) == [(0, 5), (5, 7)]
    assert plan.split(2, [1, 1, 1, 1]) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_split_covers_every_unit_once_for_awkward_weights():
    rng = random.Random(7)
    for _ in range(2000):
        ranks = rng.randint(1, 40)
        weights = [rng.choice([1e-3, 0.5, 1, 1, 2, 7.3, 48, 1e6]) for _ in range(ranks)]
        units = rng.choice([0, 1, 2, ranks - 1, ranks, 641, 642, rng.randint(0, 5000)])
        ranges = plan.split(units, weights)
        assert ranges[0][0] == 0 and ranges[-1][1] == units
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        quotas = [units * w / sum(weights) for w in weights]
        assert all(abs((b - a) - q) < 1 for (a, b), q in zip(ranges, quotas))


@pytest.mark.parametrize("chunks,batch,ranks", [(1, 1, 3), (642, 1, 7), (642, 4, 5), (13, 5, 2), (100, 3, 1)])
def test_make_plan_in_whole_batches(chunks, batch, ranks):
    work = plan.make_plan(plan.batches(10, chunks, batch), ["h"] * ranks, [1.0 + r for r in range(ranks)])
    covered = [c for a in work for start, stop in a.ranges for c in range(start, stop)]
    assert covered == list(range(10, 10 + chunks))
    assert all((start - 10) % batch == 0 for a in work for start, _ in a.batches)
    assert all(len(a.ranges) <= 1 for a in work)


def test_format_plan_lists_every_rank():
    work = plan.make_plan(plan.batches(0, 5, 1), ["a", "b", "c"], [1, 4, 0.01])
    text = plan.format_plan(work, ["cpu", "cuda:0", "cuda:1"])
    assert "[0, 1)" in text and "[1, 5)" in text and "cuda:0" in text
    assert text.splitlines()[3].split()[-2:] == ["-", "0"]


def test_unfinished_batches_and_replan():
    work = plan.batches(0, 10, 2)
    assert plan.unfinished(work, [(2, 4), (6, 10)]) == [(0, 2), (4, 6)]
    assert plan.unfinished(work, []) == work
    with pytest.raises(ValueError, match=r"\[2, 4\)"):
        plan.unfinished(work, [(3, 4)])
    again = plan.make_plan(plan.unfinished(work, [(2, 4)]), ["a", "b"], [1, 1])
    assert [a.ranges for a in again] == [[(0, 2), (4, 6)], [(6, 10)]]
    assert plan.merge_ranges([(4, 6), (0, 2), (2, 3), (5, 5)]) == [(0, 3), (4, 6)]


def test_by_slot_placement():
    lines = plan.parse_hostfile("a slots=2 # weight=2\nb slots=1\n")
    placed = plan.by_slot(lines, 3)
    assert [(line.host, local, line.weight) for line, local in placed] == [("a", 0, 2.0), ("a", 1, 2.0), ("b", 0, 1.0)]
    with pytest.raises(UserError, match="4 ranks need 4 slots"):
        plan.by_slot(lines, 4)


def test_by_slot_counts_gpus_per_host_over_several_lines():
    """One host on several lines: mpirun adds up its slots, so its ranks take GPUs 0, 1, 2 (before, each
    line started again at gpu 0)."""
    lines = plan.parse_hostfile("a slots=1\nb slots=1\na slots=2 # weight=3\n")
    placed = plan.by_slot(lines, 4)
    assert [(line.host, local, line.weight) for line, local in placed] == [
        ("a", 0, 1.0), ("a", 1, 3.0), ("a", 2, 3.0), ("b", 0, 1.0)]
    hosts = [line.host for line, _ in placed]
    assert plan.rank_weights(lines, hosts) == [line.weight for line, _ in placed]


def test_part_cuts_whole_batches():
    assert [plan.part(3, 11, 2, k, 3) for k in range(3)] == [(3, 4), (7, 4), (11, 3)]
    assert [plan.part(0, 10, 1, k, 4) for k in range(4)] == [(0, 2), (2, 3), (5, 2), (7, 3)]
    shares = [plan.part(5, 100, 7, k, 6) for k in range(6)]
    assert shares[0][0] == 5 and sum(c for _, c in shares) == 100
    assert all(a + c == b for (a, c), (b, _) in zip(shares, shares[1:]))
    assert all((s - 5) % 7 == 0 for s, _ in shares)
    with pytest.raises(UserError, match="make only 2 batches; use at most 2 parts"):
        plan.part(0, 3, 2, 0, 3)
