"""The missing-modality protocols (train/protocols.py): exact missing rates, exact missing ratios,
masks that depend on (the split, protocol, parameter, seed) only, natural absence, and the
table layout."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from train import protocols as P


def _ids(n, prefix="u"):
    return [f"{prefix}{i:05d}" for i in range(n)]


@pytest.mark.parametrize("n", [1, 7, 32, 101, 1000])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 0.5, 0.6, 2 / 3])
def test_missing_rate_is_exact_and_keeps_a_modality(n, rate):
    keep = P.masks(P.column(P.RATE, rate), _ids(n), seed=0)
    assert keep.shape == (n, 3) and keep.dtype == bool
    assert keep.sum(1).min() >= 1  # no sample loses every modality
    assert abs(P.realised_rate(keep) - rate) <= 0.5 / (3 * n) + 1e-12  # within one modality slot
    if rate == 0.0:
        assert keep.all()  # MR 0 = complete data


def test_missing_rate_above_two_thirds_is_capped_with_a_warning():
    P._WARNED.clear()  # said once per process: this test must see it
    with pytest.warns(UserWarning, match="keeps exactly one"):
        keep = P.masks("mr=0.7", _ids(60), seed=1)
    assert (keep.sum(1) == 1).all()
    assert P.realised_rate(keep) == pytest.approx(2 / 3)


def test_the_capped_warning_points_at_the_caller():
    import inspect

    P._WARNED.clear()
    with pytest.warns(UserWarning, match="keeps exactly one") as rec:
        line = inspect.currentframe().f_lineno + 1
        P.masks("mr=0.75", _ids(30), seed=1)
    assert (rec[0].filename, rec[0].lineno) == (__file__, line)
    P._WARNED.clear()
    with pytest.warns(UserWarning, match="keeps exactly one") as rec:
        line = inspect.currentframe().f_lineno + 1
        P.draw({"kind": P.RATE, "rate": 0.8}, 30, np.random.default_rng(0))
    assert (rec[0].filename, rec[0].lineno) == (__file__, line)


def test_draw_takes_its_keys_from_the_generator_first():
    """A single rate or ratio draws nothing before the keys: the batch's masks are the allocation of
    the generator's first numbers (what resuming from a saved generator state relies on)."""
    got = P.draw({"kind": P.RATE, "rate": 0.3}, 40, np.random.default_rng(5))
    assert np.array_equal(got, P.allocate_rate(np.random.default_rng(5).random((40, 3)), 0.3))
    got = P.draw({"kind": P.RATIO, "ratio": 0.4}, 40, np.random.default_rng(6))
    g = np.random.default_rng(6)
    s = g.random(40)
    assert np.array_equal(got, P.allocate_ratio(s, g.random(40), 0.4))


def test_draw_picks_conditions_and_rates_uniformly():
    rng = np.random.default_rng(0)
    avail = P.draw({"kind": P.FIXED, "choices": ["a", "v"]}, 20000, rng)
    share_a = float(avail[:, 0].mean())
    assert abs(share_a - 0.5) < 0.02  # a biased pick (e.g. index -1 allowed) gives 1/3 or 2/3
    rates = [P.realised_rate(P.draw({"kind": P.RATE, "rates": [0.1, 0.5]}, 300, rng)) for _ in range(400)]
    low = np.mean(np.isclose(rates, 0.1))
    assert abs(low - 0.5) < 0.1 and np.all(np.isclose(rates, 0.1) | np.isclose(rates, 0.5))


def test_an_unknown_training_protocol_is_refused():
    for kind in ("absent", "bogus", "zzz"):
        with pytest.raises(P.ProtocolError, match="unknown"):
            P.draw({"kind": kind}, 4, np.random.default_rng(0))


def test_the_cap_is_the_rate_over_the_split_natural_absences_included():
    """A sample with no modality at all counts M missing slots, so at the cap another sample keeps
    a second one: the split's missing rate is exactly (M - 1) / M."""
    nat = np.ones((60, 3), bool)
    nat[0] = False
    P._WARNED.clear()
    with pytest.warns(UserWarning):
        keep = P.masks("mr=0.7", _ids(60), seed=1, natural=nat)
    seen = keep & nat
    assert P.realised_rate(seen) == pytest.approx(2 / 3)
    assert sorted(seen.sum(1)[1:].tolist()).count(2) == 1 and (seen.sum(1)[1:] >= 1).all()


@pytest.mark.parametrize("n", [10, 33, 600])
@pytest.mark.parametrize("eta", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_missing_ratio_drops_exactly_one_modality_of_round_eta_n(n, eta):
    keep = P.masks(P.column(P.RATIO, eta), _ids(n), seed=3)
    lost = 3 - keep.sum(1)
    assert set(np.unique(lost)) <= {0, 1}
    assert lost.sum() == int(round(eta * n))


def test_missing_ratio_modality_is_uniform():
    keep = P.masks("eta=1", _ids(3000), seed=0)  # every sample loses one
    counts = (~keep).sum(0)
    lo, hi = binom.ppf([0.0005, 0.9995], 3000, 1 / 3)  # a 99.9% two-sided binomial band per modality
    assert ((counts >= lo) & (counts <= hi)).all(), counts


def test_masks_depend_on_the_split_protocol_parameter_and_seed_only():
    ids = _ids(200)
    a = P.masks("mr=0.4", ids, seed=7)
    perm = np.random.default_rng(0).permutation(200)
    b = P.masks("mr=0.4", [ids[i] for i in perm], seed=7)
    assert np.array_equal(a[perm], b)  # the order of the split does not matter
    assert np.array_equal(a, P.masks("mr=0.4", list(ids), seed=7))  # a rerun sees the same masks
    assert not np.array_equal(a, P.masks("mr=0.4", ids, seed=8))  # another seed, other masks
    assert not np.array_equal(P.masks("eta=0.4", ids, 7), P.masks("eta=0.4", ids, 8))
    # the counts are exact on the split, so the allocation is by rank over it: the same utterance
    # in a subset can get another mask (why report / compare refuse runs with other test ids)
    sub = P.masks("mr=0.4", ids[:20], seed=7)
    assert not np.array_equal(sub, a[:20])


def test_masks_are_nested_across_rates():
    ids = _ids(300)
    prev = np.ones((300, 3), bool)
    for r in (0.1, 0.2, 0.4, 0.6):
        cur = P.masks(P.column(P.RATE, r), ids, seed=0)
        assert not (cur & ~prev).any()  # what is missing at a lower rate stays missing
        prev = cur


def test_fixed_conditions_and_column_ids():
    keep = P.masks("ta", _ids(5), seed=0)
    assert keep.tolist() == [[True, False, True]] * 5
    assert P.normalise("ta") == "at" and P.normalise("mr=0.30") == "mr=0.3"
    assert P.expand("missing-rate") == [f"mr={r:g}" for r in (0, .1, .2, .3, .4, .5, .6, .7)]
    assert P.expand("missing-ratio=0.1,0.5") == ["eta=0.1", "eta=0.5"]
    assert P.expand("conditions")[-1] == "avt" and P.expand("a,vt") == ["a", "vt"]
    for bad in ("mr=1.0", "mr=x", "eta=1.5", "q", "missing-rate=a"):
        with pytest.raises(P.ProtocolError):
            P.expand(bad)


def test_table_groups_take_their_columns_from_the_protocol():
    cols = ["avt", "a", "v", "t", "av", "at", "vt", "mr=0.3", "mr=0", "mr=0.7", "eta=0.2"]
    g = dict(P.groups(cols))
    assert g[P.FIXED] == ["a", "v", "t", "av", "at", "vt", "average", "avt"]
    assert g[P.RATE] == ["mr=0", "mr=0.3", "mr=0.7", "mr-average"]
    assert g[P.RATIO] == ["eta=0.2"]  # a single ratio has no average column
    assert P.average_members("mr-average", g[P.RATE]) == ["mr=0.3", "mr=0.7"]  # nonzero rates only
    assert P.title("mr-average", g[P.RATE]) == "MR avg 0.3–0.7" and P.title("eta=0.2") == "η 0.2"


def test_training_rates_list_draws_one_rate_per_batch():
    rng = np.random.default_rng(0)
    seen = {round(P.realised_rate(P.draw({"kind": "missing-rate", "rates": [0.0, 0.5]}, 30, rng)), 3)
            for _ in range(40)}
    assert seen == {0.0, 0.5}


# ---- natural absence is part of the masks --------------------------------------------------------

def _natural(n, seed=0, p_absent=0.25):
    nat = np.random.default_rng(seed).random((n, 3)) > p_absent
    nat[:4] = [[True, False, False], [False, False, True], [False, False, False], [True, True, True]]
    return nat


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.3, 0.5, 0.6])
def test_missing_rate_counts_natural_absence_and_keeps_a_present_modality(rate):
    n = 400
    nat = _natural(n)
    keep = P.masks(P.column(P.RATE, rate), _ids(n), seed=4, natural=nat)
    seen = keep & nat
    has = nat.any(1)
    assert (seen.sum(1)[has] >= 1).all()  # a sample keeps a modality it really has
    assert seen[0, 0] and seen[1, 2]  # a sample with one present modality keeps it
    natural_mr = 1 - nat.mean()
    # what the model sees is the rate asked for, once the natural absences are below it
    want = max(rate, natural_mr)
    assert abs(P.realised(seen)["mr"] - want) <= 0.5 / (3 * n) + 1e-12
    assert not (~keep & ~nat).any()  # a mask never "drops" what is naturally absent
    # never more dropped than needed, and nested across rates
    lower = P.masks(P.column(P.RATE, max(rate - 0.1, 0.0)), _ids(n), seed=4, natural=nat)
    assert not (keep & ~lower).any()


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.5, 0.8])
def test_missing_ratio_counts_naturally_incomplete_samples(eta):
    n = 300
    nat = _natural(n, seed=1, p_absent=0.1)
    keep = P.masks(P.column(P.RATIO, eta), _ids(n), seed=2, natural=nat)
    seen = keep & nat
    complete = nat.all(1)
    lost = 3 - keep.sum(1)
    assert set(np.unique(lost)) <= {0, 1} and not lost[~complete].any()  # only complete samples lose one
    want = max(int(round(eta * n)), int((~complete).sum()))
    assert int((seen.sum(1) < 3).sum()) == want
    assert P.realised(seen)["eta"] == pytest.approx(want / n)


def test_masks_without_natural_absence_are_the_complete_data_masks():
    ids = _ids(97)
    for col in ("mr=0.3", "mr=0.6", "eta=0.4"):
        assert np.array_equal(P.masks(col, ids, 3), P.masks(col, ids, 3, natural=np.ones((97, 3), bool)))


def test_training_conditions_draw_keeps_a_present_modality():
    nat = np.tile([[False, True, True]], (500, 1))  # no audio anywhere
    a = P.draw({"kind": "conditions"}, 500, np.random.default_rng(0), nat)
    assert ((a & nat).sum(1) >= 1).all()  # condition "a" never leaves a sample with no input
    names = {"".join(m for m, k in zip("avt", r) if k) for r in a}
    assert names == {"v", "t", "av", "at", "vt"}  # every usable choice still drawn
    # and a rate / ratio draw follows the masks' rules
    r = P.draw({"kind": "missing-rate", "rate": 0.5}, 500, np.random.default_rng(1), nat)
    assert ((r & nat).sum(1) >= 1).all() and P.realised(r & nat)["mr"] == pytest.approx(0.5, abs=1 / 1500)


def test_realised_reports_what_the_model_saw():
    seen = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]], bool)
    assert P.realised(seen) == {"mr": pytest.approx(1 - 6 / 12), "eta": 0.75, "no_input": 0.25}


# ---- small contracts that mutation testing found unpinned ------------------------------------------

def test_column_parsing_bounds_and_defaults():
    assert P.expand("missing-ratio") == [f"eta={e:g}" for e in (0, .1, .2, .3, .4, .5)]
    for bad in ("mr=-0.1", "eta=-0.1"):
        with pytest.raises(P.ProtocolError):
            P.parse(bad)
    assert P.parse("eta=1.0") == (P.RATIO, 1.0)  # every sample loses one: allowed for eta only


def test_groups_titles_and_average_members():
    assert P.groups(["mr=0"]) == [(P.RATE, ["mr=0"])]  # one column: nothing to average
    cols = ["mr=0", "mr=0.3", "mr=0.5", "eta=0", "eta=0.2", "a"]
    assert P.average_members("mr-average", cols) == ["mr=0.3", "mr=0.5"]
    assert P.average_members("eta-average", cols) == ["eta=0.2"]
    assert P.title("a") == "{a}" and P.title("vt") == "{v,t}" and P.title("mr=0.3") == "MR 0.3"
    assert P.title("eta-average", ["eta=0.1", "eta=0.4"]) == "η avg 0.1–0.4"
    assert P.title("mr-average", ["mr=0.1", "mr=0.7"]) == "MR avg 0.1–0.7"


def test_missing_ratio_drops_the_modality_its_key_names():
    import hashlib

    ids = _ids(40)
    keep = P.masks("eta=1", ids, seed=5)
    for u, row in zip(ids, keep):
        h = hashlib.blake2b(f"{P.RATIO}|5|{u}".encode(), digest_size=32).digest()
        key0 = np.frombuffer(h, dtype="<u8")[0] / 2.0 ** 64
        assert not row[int(key0 * 3)] and row.sum() == 2
    edge = P.allocate_ratio(np.array([0.1, 0.2]), np.array([1.0, 0.0]), 1.0)  # a key of exactly 1
    assert edge.tolist() == [[True, True, False], [False, True, True]]


def test_rate_cap_and_samples_without_any_modality():
    P._WARNED.clear()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keep = P.allocate_rate(np.random.default_rng(0).random((30, 3)), 2 / 3)  # reachable: no warning
    assert (keep.sum(1) == 1).all()
    nat = np.ones((4, 3), bool)
    nat[0] = False  # a sample with nothing: it drops nothing and breaks nothing
    keep = P.allocate_rate(np.random.default_rng(1).random((4, 3)), 0.5, nat)
    assert keep[0].all() and ((keep & nat)[1:].sum(1) >= 1).all()
    assert P.realised(keep & nat)["mr"] == pytest.approx(0.5)


def test_realised_edge_cases():
    assert P.realised(np.zeros((0, 3), bool)) == {"mr": 0.0, "eta": 0.0, "no_input": 0.0}
    assert P.realised(np.array([[0, 0, 0], [1, 1, 1]], bool)) == {"mr": 0.5, "eta": 0.5, "no_input": 0.5}
    assert P.realised_rate(np.array([[1, 0, 0]], bool)) == pytest.approx(2 / 3)


def test_training_draw_rejects_unknown_kinds_and_is_seeded():
    with pytest.raises(P.ProtocolError, match="unknown"):
        P.draw({"kind": "bogus"}, 3, np.random.default_rng(0))
    with pytest.raises(P.ProtocolError):
        P.draw({"kind": "missing-rate"}, 3, np.random.default_rng(0))
    nat = np.tile([[False, True, True]], (200, 1))
    a = P.draw({"kind": "conditions"}, 200, np.random.default_rng(3), nat)
    b = P.draw({"kind": "conditions"}, 200, np.random.default_rng(3), nat)
    assert np.array_equal(a, b)
    # the redrawn picks (rows whose first pick was "a") are spread over the usable conditions
    first = P.draw({"kind": "conditions"}, 200, np.random.default_rng(3))
    redrawn = a[(first == [True, False, False]).all(1)]
    assert len({tuple(r) for r in redrawn}) >= 3
    none = np.zeros((50, 3), bool)  # no modality at all: any pick, still drawn at random
    c = P.draw({"kind": "conditions"}, 50, np.random.default_rng(4), none)
    assert len({tuple(r) for r in c}) > 1
