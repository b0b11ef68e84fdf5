"""Secure aggregation: real X25519/ChaCha20/Shamir, no mocks; the aggregator learns only the sum."""

from __future__ import annotations

import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy.stats import chisquare

from fedpriv.common import signing
from fedpriv.common.secagg import (
    AggregatorSession,
    EncodingOverflowError,
    FixedPoint,
    RoundAbandoned,
    SecAggConfig,
    SecAggError,
    SiteSession,
    default_threshold,
)
from fedpriv.common.secagg.keys import EphemeralKeys, advertise

LENGTH = 30_000
SCALE = 2.0**20
BOUND = 2**40  # |value| up to 2^20 per coordinate


def make_config(n: int, t: int = 1, threshold: int | None = None, length: int = LENGTH, round_: int = 3):
    names = tuple(f"site-{i:02d}" for i in range(n))
    return SecAggConfig(
        run_id="run-7",
        round=round_,
        sites=names,
        threshold=default_threshold(n, t) if threshold is None else threshold,
        max_colluding=t,
        length=length,
        scale=SCALE,
        bound=BOUND,
    )


def make_sites(config: SecAggConfig):
    identities = {name: Ed25519PrivateKey.generate() for name in config.sites}
    pinned = {name: signing.public_b64(key) for name, key in identities.items()}
    sites = {name: SiteSession(config, name, identities[name], pinned) for name in config.sites}
    return sites, identities, pinned


def make_vectors(config: SecAggConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {name: rng.normal(scale=3.0, size=config.length) for name in config.sites}


def run_round(config, sites, vectors, *, silent_at_share=(), silent_at_mask=(), silent_at_unmask=()):
    """Drives all four stages; sites in silent_at_X drop out just before answering stage X."""
    aggregator = AggregatorSession(config)
    broadcast = aggregator.collect_advertisements({name: site.advertise() for name, site in sites.items()})
    sealed = {name: sites[name].share_keys(broadcast) for name in broadcast if name not in silent_at_share}
    routed = aggregator.collect_shares(sealed)
    masked = {name: sites[name].mask(routed[name], vectors[name]) for name in routed if name not in silent_at_mask}
    survivors, dropped = aggregator.collect_masked(masked)
    answers = {name: sites[name].unmask(survivors, dropped) for name in survivors if name not in silent_at_unmask}
    return aggregator.collect_unmask(answers), survivors, dropped


def assert_sum(config, total, vectors, survivors):
    expected = np.sum([vectors[name] for name in survivors], axis=0)
    error = np.max(np.abs(total - expected))
    assert error <= config.fixed_point.quantization_error(len(survivors)) + 1e-9, error


@pytest.mark.parametrize("n", [2, 3, 10])
def test_masks_cancel_and_sum_is_exact_within_quantization(n):
    config = make_config(n, t=1 if n > 2 else 0)
    sites, _, _ = make_sites(config)
    vectors = make_vectors(config, seed=n)
    total, survivors, dropped = run_round(config, sites, vectors)
    assert dropped == [] and len(survivors) == n
    assert_sum(config, total, vectors, survivors)


def _byte_histogram_pvalue(values: np.ndarray) -> float:
    counts = np.bincount(np.ascontiguousarray(values).view(np.uint8), minlength=256)
    return float(chisquare(counts).pvalue)


def test_one_masked_vector_looks_uniform_but_its_encoding_does_not():
    config = make_config(3)
    sites, _, _ = make_sites(config)
    constant = {name: np.full(config.length, 0.25) for name in config.sites}
    aggregator = AggregatorSession(config)
    broadcast = aggregator.collect_advertisements({name: site.advertise() for name, site in sites.items()})
    routed = aggregator.collect_shares({name: sites[name].share_keys(broadcast) for name in broadcast})
    masked = sites["site-00"].mask(routed["site-00"], constant["site-00"])

    # 240,000 bytes over 256 cells: a uniform source fails p > 1e-6 once in a million runs.
    assert _byte_histogram_pvalue(masked) > 1e-6
    top_bits = masked >> np.uint64(63)
    assert chisquare(np.bincount(top_bits.astype(np.int64), minlength=2)).pvalue > 1e-6
    # The same test on what the site would send without masks: constant and random alike are caught.
    assert _byte_histogram_pvalue(config.fixed_point.encode(constant["site-00"])) < 1e-12
    noisy = np.random.default_rng(1).normal(scale=3.0, size=config.length)
    assert _byte_histogram_pvalue(config.fixed_point.encode(noisy)) < 1e-12


def test_sites_dropped_before_and_after_masking_are_recovered():
    config = make_config(6, t=2)  # threshold 4
    sites, _, _ = make_sites(config)
    vectors = make_vectors(config, seed=5)
    total, survivors, dropped = run_round(
        config, sites, vectors, silent_at_mask=("site-02",), silent_at_unmask=("site-04",)
    )
    # site-02's pairwise masks were in everyone's vector and are removed from its shared s_sk;
    # site-04 sent its vector, then vanished: it counts, its self-mask comes from others' shares.
    assert dropped == ["site-02"] and "site-04" in survivors
    assert_sum(config, total, vectors, survivors)


def test_a_site_silent_at_key_sharing_is_left_out_of_the_masks():
    config = make_config(5, t=1)
    sites, _, _ = make_sites(config)
    vectors = make_vectors(config, seed=6)
    total, survivors, dropped = run_round(config, sites, vectors, silent_at_share=("site-03",))
    assert "site-03" not in survivors and dropped == []
    assert_sum(config, total, vectors, survivors)


def test_below_threshold_the_round_is_abandoned_and_nothing_is_released():
    config = make_config(5, t=1)  # threshold 4
    sites, _, _ = make_sites(config)
    vectors = make_vectors(config)
    with pytest.raises(RoundAbandoned, match="2 of 5 sites sent a masked vector, below the threshold 4"):
        run_round(config, sites, vectors, silent_at_mask=("site-01", "site-02", "site-03"))

    sites, _, _ = make_sites(config)
    with pytest.raises(RoundAbandoned, match="3 of 5 sites answered the unmask request"):
        run_round(config, sites, vectors, silent_at_unmask=("site-00", "site-04"))

    aggregator = AggregatorSession(config)
    sites, _, _ = make_sites(config)
    with pytest.raises(RoundAbandoned, match="3 of 5 sites advertised keys"):
        aggregator.collect_advertisements({name: sites[name].advertise() for name in config.sites[:3]})


def _forwarded(config):
    sites, identities, pinned = make_sites(config)
    aggregator = AggregatorSession(config)
    broadcast = aggregator.collect_advertisements({name: site.advertise() for name, site in sites.items()})
    return sites, identities, pinned, broadcast


def test_a_substituted_ephemeral_key_is_refused():
    config = make_config(4)
    sites, _, _, broadcast = _forwarded(config)
    # The aggregator swaps site-02's keys for its own but keeps site-02's signature.
    own = EphemeralKeys.generate()
    forged = dict(broadcast, **{"site-02": dict(broadcast["site-02"], c_pk=own.c_pk, s_pk=own.s_pk)})
    with pytest.raises(SecAggError, match="site 'site-02': advertisement signature does not verify"):
        sites["site-00"].share_keys(forged)

    # ...or signs its own keys with an identity key nobody pinned for site-02.
    sites, _, _, broadcast = _forwarded(config)
    resigned = dict(broadcast, **{"site-02": advertise(config, "site-02", Ed25519PrivateKey.generate(), own)})
    with pytest.raises(SecAggError, match="site 'site-02': advertisement signature does not verify"):
        sites["site-01"].share_keys(resigned)

    # ...or replays an advertisement of another round (the config digest is signed).
    other = make_config(4, round_=4)
    sites, identities, pinned, broadcast = _forwarded(config)
    replayed = dict(broadcast, **{"site-03": SiteSession(other, "site-03", identities["site-03"], pinned).advertise()})
    with pytest.raises(SecAggError, match="site 'site-03'"):
        sites["site-00"].share_keys(replayed)


def test_a_site_refuses_peers_without_a_pinned_key_and_forwarded_sets_without_its_own_keys():
    config = make_config(4)
    _, identities, pinned, broadcast = _forwarded(config)
    partial = {name: key for name, key in pinned.items() if name != "site-03"}
    site = SiteSession(config, "site-00", identities["site-00"], partial)
    site.advertise()
    with pytest.raises(SecAggError, match="site 'site-03': no identity key is pinned"):
        site.share_keys(broadcast)  # the broadcast is valid, but site-03 cannot be checked

    sites, _, _, broadcast = _forwarded(config)
    without_own = {name: ad for name, ad in broadcast.items() if name != "site-01"}
    with pytest.raises(SecAggError, match="do not carry this site's own keys"):
        sites["site-01"].share_keys(without_own)


def test_overflow_is_refused_at_encode_and_detected_at_decode():
    codec = FixedPoint(SCALE, BOUND)
    values = np.zeros(10)
    values[7] = 2.0**21
    with pytest.raises(EncodingOverflowError, match="coordinate 7"):
        codec.encode(values)
    values[7] = np.nan
    with pytest.raises(OverflowError, match="coordinate 7"):
        codec.encode(values)
    with pytest.raises(SecAggError, match="lower the bound"):
        SecAggConfig("r", 1, ("a", "b", "c"), 2, 1, 10, SCALE, 2**62)

    # A site that bypasses its bound: the sum leaves n x bound and is refused, not wrapped.
    config = make_config(3)
    sites, _, _ = make_sites(config)
    vectors = make_vectors(config)
    aggregator = AggregatorSession(config)
    broadcast = aggregator.collect_advertisements({name: site.advertise() for name, site in sites.items()})
    routed = aggregator.collect_shares({name: sites[name].share_keys(broadcast) for name in broadcast})
    masked = {name: sites[name].mask(routed[name], vectors[name]) for name in routed}
    masked["site-01"][123] += np.uint64(2**62)
    survivors, dropped = aggregator.collect_masked(masked)
    with pytest.raises(EncodingOverflowError, match="coordinate 123: the unmasked sum"):
        aggregator.collect_unmask({name: sites[name].unmask(survivors, dropped) for name in survivors})


def _masked_round(config):
    sites, _, _ = make_sites(config)
    vectors = make_vectors(config)
    aggregator = AggregatorSession(config)
    broadcast = aggregator.collect_advertisements({name: site.advertise() for name, site in sites.items()})
    routed = aggregator.collect_shares({name: sites[name].share_keys(broadcast) for name in broadcast})
    for name in routed:
        sites[name].mask(routed[name], vectors[name])
    return sites, routed, vectors


def test_a_site_never_reveals_both_secrets_of_a_peer():
    config = make_config(5, t=1)
    sites, routed, vectors = _masked_round(config)
    everyone = list(config.sites)
    with pytest.raises(SecAggError, match=r"\['site-03'\] named both survivor and dropped"):
        sites["site-00"].unmask(everyone, ["site-03"])
    with pytest.raises(SecAggError, match="does not list it as a survivor"):
        sites["site-00"].unmask(everyone[1:], ["site-00"])
    with pytest.raises(SecAggError, match="are not the sites it masked with"):
        sites["site-00"].unmask(everyone[:4], [])  # site-04 left out of both lists
    with pytest.raises(RoundAbandoned):
        sites["site-00"].unmask(everyone[:3], everyone[3:])  # 3 survivors < threshold 4
    assert sites["site-00"].unmask(everyone[:4], ["site-04"])
    with pytest.raises(SecAggError, match="unmask requested in stage 'revealed'"):
        sites["site-00"].unmask(everyone, [])  # a second request, e.g. with another story
    with pytest.raises(SecAggError, match="mask requested in stage"):
        sites["site-01"].mask(routed["site-01"], vectors["site-01"])  # a second masked vector


def test_config_enforces_the_threshold_rule():
    assert default_threshold(10, 1) == 9
    # a cohort down to two sites (one dropped before the round) still gets a valid round, without dropout tolerance
    for n, t in [(2, 1), (3, 1), (4, 2), (5, 2), (10, 4), (2, 0)]:
        k = default_threshold(n, t)
        assert t < k <= n and 2 * k > n, (n, t, k)
        make_config(n, t=t)
    assert default_threshold(2, 1) == 2
    assert make_config(10, t=1).actively_secure
    assert not make_config(3, t=1).actively_secure  # threshold 2 of 3: fine passively, not against lies
    with pytest.raises(SecAggError, match="threshold > max-colluding-sites"):
        make_config(4, t=2, threshold=2)
    with pytest.raises(SecAggError, match="threshold > sites / 2"):
        make_config(10, t=1, threshold=5)


def test_site_session_survives_between_stages_in_flat_state():
    config = make_config(4, length=1000)
    sites, identities, pinned = make_sites(config)
    vectors = make_vectors(config, seed=9)

    def reload(name):
        state = sites[name].to_state()
        assert all(isinstance(value, bytes | str | int) for value in state.values()), state
        sites[name] = SiteSession.from_state(dict(state), identities[name], pinned)
        assert sites[name].to_state() == state

    aggregator = AggregatorSession(config)
    ads = {}
    for name in config.sites:
        ads[name] = sites[name].advertise()
        reload(name)
    broadcast = aggregator.collect_advertisements(ads)
    sealed = {}
    for name in config.sites:
        sealed[name] = sites[name].share_keys(broadcast)
        reload(name)
    routed = aggregator.collect_shares(sealed)
    masked = {}
    for name in config.sites[:3]:  # site-03 drops after key sharing
        masked[name] = sites[name].mask(routed[name], vectors[name])
        reload(name)
    survivors, dropped = aggregator.collect_masked(masked)
    total = aggregator.collect_unmask({name: sites[name].unmask(survivors, dropped) for name in survivors})
    assert_sum(config, total, vectors, survivors)

    with pytest.raises(SecAggError, match="not the one pinned"):
        SiteSession.from_state(sites["site-00"].to_state(), Ed25519PrivateKey.generate(), pinned)
    with pytest.raises(SecAggError, match="state is incomplete or corrupt"):
        SiteSession.from_state({"site": "site-00"}, identities["site-00"], pinned)


def test_round_cost_10_sites_30k_values(capsys):
    """Not asserted: the per-round cost, to budget the Flower integration."""
    config = make_config(10, t=1)
    sites, _, _ = make_sites(config)
    vectors = make_vectors(config)
    start = time.perf_counter()
    total, survivors, _ = run_round(config, sites, vectors, silent_at_mask=("site-09",))
    with_dropout = time.perf_counter() - start
    sites, _, _ = make_sites(config)
    start = time.perf_counter()
    run_round(config, sites, vectors)
    clean = time.perf_counter() - start
    assert_sum(config, total, vectors, survivors)
    with capsys.disabled():
        print(
            f"\nsecagg round, 10 sites x {LENGTH} values, all stages in one process: "
            f"{clean * 1000:.0f} ms; with one dropout {with_dropout * 1000:.0f} ms"
        )


def test_any_threshold_of_shares_rebuild_the_secret_and_a_wrong_share_is_caught():
    import itertools
    import os

    from fedpriv.common.secagg import shares

    secret = os.urandom(shares.SECRET_BYTES)
    split = shares.split(secret, 3, 5)
    for chosen in itertools.combinations(split, 3):
        assert shares.combine({i: split[i] for i in chosen}, 3, "s") == secret
    with pytest.raises(SecAggError, match="2 shares, the threshold is 3"):
        shares.combine({1: split[1], 2: split[2]}, 3, "s")
    bad = dict(split)
    bad[2] = os.urandom(shares.SHARE_BYTES)  # garbled (a deliberate shift is caught by the key check instead)
    with pytest.raises(SecAggError, match="a share was wrong"):
        shares.combine(bad, 3, "s")
    # Two different secrets give different shares: the polynomial is fresh each time.
    assert shares.split(secret, 3, 5) != split
