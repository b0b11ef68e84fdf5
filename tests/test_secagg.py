"""Secure aggregation: real X25519/ChaCha20/Shamir, no mocks; the aggregator learns only the sum."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy.stats import chisquare

from fedpriv.common.privacy import signing
from fedpriv.common.wire.secagg import (
    AggregatorSession,
    EncodingOverflowError,
    FixedPoint,
    RoundAbandoned,
    SecAggConfig,
    SecAggError,
    SiteSession,
    default_threshold,
)
from fedpriv.common.wire.secagg.keys import EphemeralKeys, advertise

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


def agree(config, sites, *, silent=()):
    """Key agreement: advertise, then every advertiser accepts the forwarded advertisements."""
    aggregator = AggregatorSession(config)
    ads = {name: site.advertise() for name, site in sites.items() if name not in silent}
    broadcast = aggregator.collect_advertisements(ads)
    for name in broadcast:
        sites[name].accept_peers(broadcast)
    return aggregator


def mask_all(config, aggregator, sites, vectors, *, silent=()):
    out = {name: sites[name].mask(config, vectors[name]) for name in aggregator.group if name not in silent}
    masked = {name: vector for name, (vector, _) in out.items()}
    sealed = {name: seed_shares for name, (_, seed_shares) in out.items()}
    return masked, sealed


def unmask_all(config, aggregator, sites, survivors, dropped, routed, *, silent=()):
    answers = {
        name: sites[name].unmask(config, survivors, dropped, routed[name]) for name in survivors if name not in silent
    }
    return aggregator.collect_unmask(
        {name: seeds for name, (seeds, _) in answers.items()}, {name: keys for name, (_, keys) in answers.items()}
    )


def run_round(config, aggregator, sites, vectors, *, silent_at_mask=(), silent_at_unmask=()):
    """One round of agreed keys; sites in silent_at_X drop out just before answering X."""
    masked, sealed = mask_all(config, aggregator, sites, vectors, silent=silent_at_mask)
    survivors, dropped, routed = aggregator.collect_masked(config, masked, sealed)
    total = unmask_all(config, aggregator, sites, survivors, dropped, routed, silent=silent_at_unmask)
    return total, survivors, dropped


def assert_sum(config, total, vectors, survivors):
    expected = np.sum([vectors[name] for name in survivors], axis=0)
    error = np.max(np.abs(total - expected))
    assert error <= config.fixed_point.quantization_error(len(survivors)) + 1e-9, error


@pytest.mark.parametrize("n", [2, 3, 10])
def test_masks_cancel_round_after_round_with_keys_agreed_once(n):
    config = make_config(n, t=1 if n > 2 else 0, length=2_000)
    sites, _, _ = make_sites(config)
    aggregator = agree(config, sites)
    for rnd in (3, 4, 7):  # steady state: the keys of round 3, masks of each round
        vectors = make_vectors(config, seed=rnd)
        total, survivors, dropped = run_round(config.for_round(rnd), aggregator, sites, vectors)
        assert dropped == [] and len(survivors) == n
        assert_sum(config, total, vectors, survivors)


def test_the_masks_of_one_pair_differ_from_round_to_round():
    config = make_config(3, length=1000)
    sites, _, _ = make_sites(config)
    aggregator = agree(config, sites)
    zero = dict.fromkeys(config.sites, np.zeros(config.length))
    first, _ = mask_all(config, aggregator, sites, zero)
    second, _ = mask_all(config.for_round(4), aggregator, sites, zero)
    for name in config.sites:
        assert np.count_nonzero(first[name] == second[name]) < 5  # uniform uint64s: equal only by chance


def _byte_histogram_pvalue(values: np.ndarray) -> float:
    counts = np.bincount(np.ascontiguousarray(values).view(np.uint8), minlength=256)
    return float(chisquare(counts).pvalue)


def test_one_masked_vector_looks_uniform_but_its_encoding_does_not():
    config = make_config(3)
    sites, _, _ = make_sites(config)
    constant = {name: np.full(config.length, 0.25) for name in config.sites}
    agree(config, sites)
    masked, _ = sites["site-00"].mask(config, constant["site-00"])

    # 240,000 bytes over 256 cells: a uniform source fails p > 1e-6 once in a million runs.
    assert _byte_histogram_pvalue(masked) > 1e-6
    top_bits = masked >> np.uint64(63)
    assert chisquare(np.bincount(top_bits.astype(np.int64), minlength=2)).pvalue > 1e-6
    # The same test on what the site would send without masks: constant and random alike are caught.
    assert _byte_histogram_pvalue(config.fixed_point.encode(constant["site-00"])) < 1e-12
    noisy = np.random.default_rng(1).normal(scale=3.0, size=config.length)
    assert _byte_histogram_pvalue(config.fixed_point.encode(noisy)) < 1e-12


def test_steady_state_dropouts_before_and_after_masking_are_recovered_and_the_keys_live_on():
    config = make_config(6, t=2, length=3000)  # threshold 4
    sites, _, _ = make_sites(config)
    aggregator = agree(config, sites)
    run_round(config, aggregator, sites, make_vectors(config, seed=1))
    # Round 4: site-02 drops before masking. Its pair masks were in everyone's vector; each survivor
    # reveals its pair key with site-02 of round 4 only.
    vectors = make_vectors(config, seed=4)
    total, survivors, dropped = run_round(config.for_round(4), aggregator, sites, vectors, silent_at_mask=("site-02",))
    assert dropped == ["site-02"]
    assert_sum(config, total, vectors, survivors)
    # Round 5: site-04 masks, then vanishes; nobody dropped, so its b comes from the others' shares.
    vectors = make_vectors(config, seed=5)
    total, survivors, dropped = run_round(
        config.for_round(5), aggregator, sites, vectors, silent_at_unmask=("site-04",)
    )
    assert dropped == [] and "site-04" in survivors
    assert_sum(config, total, vectors, survivors)
    # Round 6: the same keys, every site back, site-02 included (nothing of it was revealed but round 4's
    # pair keys, which mask nothing now).
    vectors = make_vectors(config, seed=6)
    total, survivors, dropped = run_round(config.for_round(6), aggregator, sites, vectors)
    assert dropped == [] and len(survivors) == 6
    assert_sum(config, total, vectors, survivors)


def test_a_dropout_needs_every_survivors_pair_keys():
    config = make_config(6, t=2, length=1000)  # threshold 4
    sites, _, _ = make_sites(config)
    aggregator = agree(config, sites)
    with pytest.raises(RoundAbandoned, match=r"\['site-04'\] sent a masked vector but no pair keys"):
        run_round(
            config, aggregator, sites, make_vectors(config), silent_at_mask=("site-02",), silent_at_unmask=("site-04",)
        )


def test_a_site_silent_at_key_agreement_is_left_out_of_the_masks():
    config = make_config(5, t=1)
    sites, _, _ = make_sites(config)
    vectors = make_vectors(config, seed=6)
    aggregator = agree(config, sites, silent=("site-03",))
    total, survivors, dropped = run_round(config, aggregator, sites, vectors)
    assert "site-03" not in survivors and dropped == []
    assert_sum(config, total, vectors, survivors)


def test_below_threshold_the_round_is_abandoned_and_nothing_is_released():
    config = make_config(5, t=1)  # threshold 4
    sites, _, _ = make_sites(config)
    vectors = make_vectors(config)
    aggregator = agree(config, sites)
    with pytest.raises(RoundAbandoned, match="2 of 5 sites sent a masked vector, below the threshold 4"):
        run_round(config, aggregator, sites, vectors, silent_at_mask=("site-01", "site-02", "site-03"))

    with pytest.raises(RoundAbandoned, match="3 of 5 sites answered the unmask request"):
        run_round(config.for_round(4), aggregator, sites, vectors, silent_at_unmask=("site-00", "site-04"))

    sites, _, _ = make_sites(config)
    with pytest.raises(RoundAbandoned, match="3 of 5 sites advertised keys"):
        agree(config, sites, silent=("site-03", "site-04"))


def _forwarded(config):
    sites, identities, pinned = make_sites(config)
    aggregator = AggregatorSession(config)
    broadcast = aggregator.collect_advertisements({name: site.advertise() for name, site in sites.items()})
    return sites, identities, pinned, broadcast


def test_a_substituted_key_is_refused():
    config = make_config(4)
    sites, _, _, broadcast = _forwarded(config)
    # The aggregator swaps site-02's keys for its own but keeps site-02's signature.
    own = EphemeralKeys.generate()
    forged = dict(broadcast, **{"site-02": dict(broadcast["site-02"], c_pk=own.c_pk, s_pk=own.s_pk)})
    with pytest.raises(SecAggError, match="site 'site-02': advertisement signature does not verify"):
        sites["site-00"].accept_peers(forged)

    # ...or signs its own keys with an identity key nobody pinned for site-02.
    sites, _, _, broadcast = _forwarded(config)
    resigned = dict(broadcast, **{"site-02": advertise(config, "site-02", Ed25519PrivateKey.generate(), own)})
    with pytest.raises(SecAggError, match="site 'site-02': advertisement signature does not verify"):
        sites["site-01"].accept_peers(resigned)

    # ...or replays an advertisement of another key agreement (the epoch's config digest is signed).
    other = make_config(4, round_=4)
    sites, identities, pinned, broadcast = _forwarded(config)
    replayed = dict(broadcast, **{"site-03": SiteSession(other, "site-03", identities["site-03"], pinned).advertise()})
    with pytest.raises(SecAggError, match="site 'site-03'"):
        sites["site-00"].accept_peers(replayed)
    # A refused forwarding leaves the site unkeyed: it masks nothing.
    with pytest.raises(SecAggError, match="mask requested in stage 'advertised'"):
        sites["site-00"].mask(config, np.zeros(config.length))


def test_a_site_refuses_peers_without_a_pinned_key_and_forwarded_sets_without_its_own_keys():
    config = make_config(4)
    _, identities, pinned, broadcast = _forwarded(config)
    partial = {name: key for name, key in pinned.items() if name != "site-03"}
    site = SiteSession(config, "site-00", identities["site-00"], partial)
    site.advertise()
    with pytest.raises(SecAggError, match="site 'site-03': no identity key is pinned"):
        site.accept_peers(broadcast)  # the broadcast is valid, but site-03 cannot be checked

    sites, _, _, broadcast = _forwarded(config)
    without_own = {name: ad for name, ad in broadcast.items() if name != "site-01"}
    with pytest.raises(SecAggError, match="do not carry this site's own keys"):
        sites["site-01"].accept_peers(without_own)


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
    aggregator = agree(config, sites)
    masked, sealed = mask_all(config, aggregator, sites, make_vectors(config))
    masked["site-01"][123] += np.uint64(2**62)
    survivors, dropped, routed = aggregator.collect_masked(config, masked, sealed)
    with pytest.raises(EncodingOverflowError, match="coordinate 123: the unmasked sum"):
        unmask_all(config, aggregator, sites, survivors, dropped, routed)


def test_a_site_never_reveals_both_secrets_of_a_peer_in_one_round():
    config = make_config(5, t=1, length=1000)
    sites, _, _ = make_sites(config)
    aggregator = agree(config, sites)
    masked, sealed = mask_all(config, aggregator, sites, make_vectors(config))
    everyone = list(config.sites)
    _, _, routed = aggregator.collect_masked(config, masked, sealed)
    site = sites["site-00"]
    mine = routed["site-00"]
    with pytest.raises(SecAggError, match=r"\['site-03'\] named both survivor and dropped"):
        site.unmask(config, everyone, ["site-03"], mine)
    with pytest.raises(SecAggError, match="does not list it as a survivor"):
        site.unmask(config, everyone[1:], ["site-00"], mine)
    with pytest.raises(SecAggError, match="are not the sites it masked with"):
        site.unmask(config, everyone[:4], [], mine)  # site-04 left out of both lists
    with pytest.raises(RoundAbandoned):
        site.unmask(config, everyone[:3], everyone[3:], mine)  # 3 survivors < threshold 4
    # site-04 named dropped, yet its seed share is forwarded: revealing it and the pair key would unmask it.
    with pytest.raises(SecAggError, match="not from the other survivors"):
        site.unmask(config, everyone[:4], ["site-04"], mine)
    with pytest.raises(SecAggError, match="not from the other survivors"):
        site.unmask(config, everyone, [], {k: v for k, v in mine.items() if k != "site-02"})
    without_04 = {k: v for k, v in mine.items() if k != "site-04"}
    seeds, keys = site.unmask(config, everyone[:4], ["site-04"], without_04)
    assert sorted(seeds) == everyone[:4] and sorted(keys) == ["site-04"]
    with pytest.raises(SecAggError, match="awaits no unmask request for that round"):
        site.unmask(config, everyone, [], mine)  # a second request, e.g. with another story
    with pytest.raises(SecAggError, match="not after the last round it masked"):
        sites["site-01"].mask(config, np.zeros(config.length))  # a second masked vector of the round


def test_replaying_a_round_in_the_next_one_unmasks_nothing_useful():
    config = make_config(4, t=1, length=2000)
    sites, _, _ = make_sites(config)
    aggregator = agree(config, sites)
    old = make_vectors(config, seed=1)
    masked_3, sealed_3 = mask_all(config, aggregator, sites, old)
    survivors, dropped, routed_3 = aggregator.collect_masked(config, masked_3, sealed_3)
    answers_3 = {s: sites[s].unmask(config, survivors, dropped, routed_3[s]) for s in survivors}
    aggregator.collect_unmask({s: a[0] for s, a in answers_3.items()}, {s: a[1] for s, a in answers_3.items()})

    round_4 = config.for_round(4)
    new = make_vectors(config, seed=2)
    masked_4, sealed_4 = mask_all(round_4, aggregator, sites, new)
    # The aggregator swaps in site-02's masked vector of round 3: its masks of round 3 stay in the sum.
    swapped = dict(masked_4, **{"site-02": masked_3["site-02"]})
    survivors, dropped, routed_4 = aggregator.collect_masked(round_4, swapped, sealed_4)
    # A site refuses round 3's seed shares forwarded in round 4 (AEAD bound to round, sender, recipient).
    with pytest.raises(SecAggError, match="do not authenticate"):
        sites["site-00"].unmask(round_4, survivors, dropped, routed_3["site-00"])
    answers_4 = {s: sites[s].unmask(round_4, survivors, dropped, routed_4[s]) for s in survivors}
    expected = {"old": np.sum([old[s] for s in survivors], axis=0), "new": np.sum([new[s] for s in survivors], axis=0)}
    mixed = dict(new, **{"site-02": old["site-02"]})
    expected["mixed"] = np.sum([mixed[s] for s in survivors], axis=0)

    def unmasked(answers) -> np.ndarray | None:
        try:
            return aggregator.collect_unmask(
                {s: a[0] for s, a in answers.items()}, {s: a[1] for s, a in answers.items()}
            )
        except EncodingOverflowError:  # what a leftover uniform mask almost always gives
            return None
        finally:
            aggregator._round = replay_state  # the same masked sum, unmasked again with other answers

    replay_state = aggregator._round
    for answers in (answers_4, answers_3):  # round 4's answers, or round 3's replayed
        total = unmasked(answers)
        if total is not None:
            for true_sum in expected.values():
                assert np.max(np.abs(total - true_sum)) > 1.0
    # Nor does a site mask round 3 again, or answer round 3's unmask request again.
    with pytest.raises(SecAggError, match="not after the last round it masked"):
        sites["site-01"].mask(config, old["site-01"])
    with pytest.raises(SecAggError, match="awaits no unmask request for that round"):
        sites["site-01"].unmask(config, survivors, dropped, routed_3["site-01"])


def test_a_revealed_pair_key_masks_nothing_in_another_round():
    from fedpriv.common.wire.secagg.derive import pair_key
    from fedpriv.common.wire.secagg.masks import pair_mask

    config = make_config(4, t=1, length=1000)
    sites, _, _ = make_sites(config)
    aggregator = agree(config, sites)
    masked, sealed = mask_all(config, aggregator, sites, make_vectors(config), silent=("site-03",))
    survivors, dropped, routed = aggregator.collect_masked(config, masked, sealed)
    _, keys = sites["site-00"].unmask(config, survivors, dropped, routed["site-00"])
    revealed = keys["site-03"]
    # Round 4's pair mask of (site-00, site-03), as site-00 adds it, is not what round 3's key gives.
    site = sites["site-00"]
    assert site._keys is not None
    round_4 = config.for_round(4)
    fresh = pair_key(round_4, "site-00", "site-03", site._keys.s_private, site._peers["site-03"].s_pk)
    assert fresh != revealed
    assert (
        np.count_nonzero(
            pair_mask(round_4, "site-00", "site-03", fresh) == pair_mask(round_4, "site-00", "site-03", revealed)
        )
        < 5
    )


def test_a_site_masks_only_rounds_of_its_own_keys():
    config = make_config(3, length=100)
    sites, _, _ = make_sites(config)
    agree(config, sites)
    grown = dataclasses.replace(config, sites=(*config.sites, "site-03"), threshold=3)
    with pytest.raises(SecAggError, match="names keys of round 3 or another cohort"):
        sites["site-00"].mask(grown, np.zeros(100))
    with pytest.raises(SecAggError, match="names keys of round 4"):
        sites["site-00"].mask(make_config(3, length=100, round_=4), np.zeros(100))


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
    assert not make_config(4, t=1).actively_secure  # 2k > n + t + 1 fails at n = 3t + 1
    assert make_config(5, t=1).actively_secure
    with pytest.raises(SecAggError, match="threshold > max-colluding-sites"):
        make_config(4, t=2, threshold=2)
    with pytest.raises(SecAggError, match="threshold > sites / 2"):
        make_config(10, t=1, threshold=5)
    with pytest.raises(SecAggError, match="round 3 cannot use keys agreed in round 4"):
        dataclasses.replace(make_config(3), epoch=4)


def test_site_session_survives_between_steps_and_rounds_in_flat_state():
    config = make_config(4, length=1000)
    sites, identities, pinned = make_sites(config)

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
    for name in config.sites:
        sites[name].accept_peers(broadcast)
        reload(name)
    for rnd, silent in [(3, "site-03"), (4, "")]:  # site-03 drops in round 3, is back in round 4
        round_config, vectors = config.for_round(rnd), make_vectors(config, seed=rnd)
        masked, sealed = {}, {}
        for name in config.sites:
            if name != silent:
                masked[name], sealed[name] = sites[name].mask(round_config, vectors[name])
                reload(name)
        survivors, dropped, routed = aggregator.collect_masked(round_config, masked, sealed)
        answers = {}
        for name in survivors:
            answers[name] = sites[name].unmask(round_config, survivors, dropped, routed[name])
            reload(name)
        total = aggregator.collect_unmask({s: a[0] for s, a in answers.items()}, {s: a[1] for s, a in answers.items()})
        assert_sum(config, total, vectors, survivors)

    with pytest.raises(SecAggError, match="not the one pinned"):
        SiteSession.from_state(sites["site-00"].to_state(), Ed25519PrivateKey.generate(), pinned)
    with pytest.raises(SecAggError, match="state is incomplete or corrupt"):
        SiteSession.from_state({"site": "site-00"}, identities["site-00"], pinned)


def test_round_cost_10_sites_30k_values(capsys):
    """Not asserted: the per-round cost in steady state, to budget the Flower integration."""
    config = make_config(10, t=1)
    sites, _, _ = make_sites(config)
    vectors = make_vectors(config)
    start = time.perf_counter()
    aggregator = agree(config, sites)
    agreement = time.perf_counter() - start
    start = time.perf_counter()
    total, survivors, _ = run_round(config, aggregator, sites, vectors, silent_at_mask=("site-09",))
    with_dropout = time.perf_counter() - start
    start = time.perf_counter()
    run_round(config.for_round(4), aggregator, sites, vectors)
    clean = time.perf_counter() - start
    assert_sum(config, total, vectors, survivors)
    with capsys.disabled():
        print(
            f"\nsecagg, 10 sites x {LENGTH} values, all parties in one process: key agreement "
            f"{agreement * 1000:.0f} ms; a round {clean * 1000:.0f} ms, with one dropout {with_dropout * 1000:.0f} ms"
        )


def test_any_threshold_of_shares_rebuild_the_secret_and_a_wrong_share_is_caught():
    import itertools
    import os

    from fedpriv.common.wire.secagg import shares

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
