"""The Blend pay policy: blend only where this process measured it faster (no engine)."""

from __future__ import annotations

import pytest

from ucm.sparse.blend.pay_policy import BlendPayPolicy, StepSample

PRE = 2 / 32  # first check layer 1 of 32 layers


def _policy(per_token_s: float, fixed_s: float, **kw) -> BlendPayPolicy:
    """A policy fed with steps of a prefill costing per_token_s a row and Blend steps
    costing fixed_s more than their rows' compute."""
    policy = BlendPayPolicy(PRE, **kw)
    for rows in (1024, 4096, 8192):  # plain steps at the sizes asked (none is priced from others)
        for _ in range(3):
            policy.observe(StepSample(rows=rows, seconds=rows * per_token_s))
    for rows in (2048, 4096, 8192):
        kept = int(rows * 0.2)
        policy.observe(StepSample(rows=rows, blend=True, kept=kept,
                                  seconds=fixed_s + per_token_s * policy.equivalent_rows(rows, kept)))
    return policy


def test_it_blends_until_it_has_measured_blend():
    policy = BlendPayPolicy(PRE)
    assert policy.decide(1000, 800, 0.15).reason == "measuring"
    policy.observe(StepSample(rows=2000, seconds=0.05))
    policy.observe(StepSample(rows=2000, blend=True, kept=400, seconds=0.2))
    policy.observe(StepSample(rows=2000, blend=True, kept=400, seconds=0.2))
    assert policy.decide(1000, 800, 0.15).blend  # two Blend samples of the three it wants
    policy.observe(StepSample(rows=2000, blend=True, kept=400, seconds=0.2))
    assert policy.measured


def test_long_prompts_blend_and_short_ones_do_not():
    """8B-like: 26 us a token, 20 ms fixed: 8K pays, 1K does not (216 vs ~75 ms; 26 vs ~29 ms)."""
    policy = _policy(26e-6, 0.020)
    long = policy.decide(8192, 7000, 0.15)
    assert long.blend and long.reason == "pays" and long.blend_ms < long.plain_ms
    short = policy.decide(1024, 900, 0.15)
    assert not short.blend and short.reason == "does not pay"
    assert short.to_stats()["blend_decision"] == "plain"


def test_a_small_model_with_a_large_fixed_cost_never_blends():
    """0.5B-like: 1.4K tokens prefill in ~46 ms, Blend's fixed cost ~80 ms."""
    policy = _policy(33e-6, 0.080)
    assert not policy.decide(1400, 1200, 0.15).blend
    assert not policy.decide(1400, 1200, 0.0).blend


def test_reading_chunks_slowly_tips_the_balance():
    policy = _policy(26e-6, 0.020)
    assert policy.decide(8192, 7000, 0.15).blend
    policy.observe(StepSample(rows=1, seconds=0.0, load_tokens=7000, load_seconds=0.5))  # a slow file tier
    assert not policy.decide(8192, 7000, 0.15).blend


def test_the_margin_keeps_a_near_tie_plain():
    policy = _policy(26e-6, 0.0, margin=0.05)
    # No fixed cost and every row recomputed: Blend costs the same as plain, so not worth it.
    assert not policy.decide(4096, 4000, 1.0).blend


def test_off_blends_everything_and_nothing_to_reuse_is_plain():
    assert BlendPayPolicy(PRE, enabled=False).decide(10, 5, 0.15).reason == "always"
    assert not _policy(26e-6, 0.02).decide(8192, 0, 0.15).blend


def test_blend_samples_before_any_plain_rate_are_fitted_later():
    policy = BlendPayPolicy(PRE)
    for _ in range(3):
        policy.observe(StepSample(rows=8192, blend=True, kept=1638, seconds=0.075))
    assert not policy.measured
    for _ in range(3):
        policy.observe(StepSample(rows=8192, seconds=0.216))
    assert policy.measured and policy.decide(8192, 7000, 0.15).blend


def test_short_plain_steps_do_not_set_the_rate():
    policy = BlendPayPolicy(PRE, min_rows=128)
    policy.observe(StepSample(rows=8, seconds=0.03))  # a decode step: mostly per-step overhead
    policy.observe(StepSample(rows=8192, blend=True, kept=1638, seconds=0.075))
    assert not policy.measured


def test_pre_is_checked():
    for pre in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            BlendPayPolicy(pre)
    assert BlendPayPolicy(0.0).equivalent_rows(100, 10) == 10  # EPIC: no layer computes every row


def _attention_bound(rows: int) -> float:
    """A CPU-like plain prefill: 0.2 ms a row plus 0.3 us a row per row of context."""
    return rows * (0.2e-3 + 0.3e-6 * rows)


def test_short_prompts_do_not_price_long_ones():
    """Chunk precomputes (~200 rows) alone would make a 1.4K prompt look cheap; two sizes
    give the line, so the long prompt is priced at its own size."""
    policy = BlendPayPolicy(PRE)
    for rows in (150, 250, 600):
        policy.observe(StepSample(rows=rows, seconds=_attention_bound(rows)))
    est = policy.plain_seconds(1400)
    assert abs(est - _attention_bound(1400)) / _attention_bound(1400) < 0.05


def test_a_wrong_does_not_pay_corrects_itself_from_the_plain_run():
    """Blend measured while only short plain prompts were known looks expensive; the
    request then run plain is a plain sample at its size, and Blend is judged again."""
    policy = BlendPayPolicy(PRE)
    policy.observe(StepSample(rows=200, seconds=200 * 0.2e-3))  # only short prompts so far
    for _ in range(3):  # three 1.4K Blend steps: 20 ms fixed + compute at the true price
        true_rate = _attention_bound(1400) / 1400
        policy.observe(StepSample(rows=1400, blend=True, kept=280,
                                  seconds=0.02 + true_rate * policy.equivalent_rows(1400, 280)))
    assert policy.fixed_cost() > 0.1  # the short prompts' price leaves Blend's compute in "fixed"
    for _ in range(3):  # requests run plain (the first measuring the size)
        policy.observe(StepSample(rows=1400, seconds=_attention_bound(1400)))
    policy.observe(StepSample(rows=600, seconds=_attention_bound(600)))
    decision = policy.decide(1400, 1300, 0.15)
    assert abs(decision.plain_ms / 1e3 - _attention_bound(1400)) / _attention_bound(1400) < 0.1
    assert abs(policy.fixed_cost() - 0.02) < 0.01  # refitted against the plain line at 1.4K
    assert decision.blend


def test_one_slow_first_blend_step_does_not_condemn_blend():
    """The first Blend step pays one-time costs (a kernel's first call): the median of the
    recent steps, not their mean, sets the fixed cost."""
    policy = BlendPayPolicy(PRE)
    for _ in range(3):
        policy.observe(StepSample(rows=8192, seconds=8192 * 26e-6))
    for seconds in (0.9, 0.075, 0.076):  # first step 12x slower than the others
        policy.observe(StepSample(rows=8192, blend=True, kept=1638, seconds=seconds))
    assert policy.decide(8192, 7000, 0.15).blend


def test_a_long_run_of_plain_decisions_remeasures_blend_once():
    policy = BlendPayPolicy(PRE, remeasure_every=4)
    policy.observe(StepSample(rows=4096, seconds=4096 * 26e-6))
    for _ in range(3):  # Blend measured on a busy host: looks 30 ms dearer than plain
        policy.observe(StepSample(rows=4096, blend=True, kept=800, seconds=4096 * 26e-6 + 0.03))
    reasons = [policy.decide(4096, 3500, 0.15).reason for _ in range(9)]
    assert reasons == ["does not pay"] * 3 + ["re-measuring"] + ["does not pay"] * 3 + ["re-measuring", "does not pay"]
    far = BlendPayPolicy(PRE, remeasure_every=2)  # far from paying: never re-measured
    far.observe(StepSample(rows=4096, seconds=4096 * 26e-6))
    for _ in range(3):
        far.observe(StepSample(rows=4096, blend=True, kept=800, seconds=1.0))
    assert all(far.decide(4096, 3500, 0.15).reason == "does not pay" for _ in range(6))


def test_a_long_run_of_blend_decisions_remeasures_a_plain_prefill_once():
    """The mirror case: a plain price learned from a slow step (an engine's first forward)
    makes Blend look like it pays, and only a plain run of that size would correct it. After
    ``remeasure_every`` blend decisions in a row, one request whose plain estimate is within
    ``remeasure_within`` of Blend's runs plain. Far from a tie, Blend keeps every request."""
    policy = BlendPayPolicy(PRE, remeasure_every=4)
    for _ in range(3):  # slow plain steps (enough of them: no "measuring plain" first)
        policy.observe(StepSample(rows=4096, seconds=0.150))
    for _ in range(3):
        policy.observe(StepSample(rows=4096, blend=True, kept=800, seconds=0.120))
    reasons = [policy.decide(4096, 3500, 0.15).reason for _ in range(9)]
    assert reasons == ["pays"] * 3 + ["re-measuring plain"] + ["pays"] * 3 + ["re-measuring plain", "pays"]
    far = BlendPayPolicy(PRE, remeasure_every=2)  # Blend far cheaper: never re-measured
    for _ in range(3):
        far.observe(StepSample(rows=4096, seconds=1.0))
    for _ in range(3):
        far.observe(StepSample(rows=4096, blend=True, kept=800, seconds=0.05))
    assert all(far.decide(4096, 3500, 0.15).reason == "pays" for _ in range(6))


def test_decode_steps_are_not_timed_or_reported():
    import torch

    from ucm.engine.step_timer import ForwardTimer

    reads = []

    def clock() -> float:
        reads.append(1)
        return float(len(reads))

    timer = ForwardTimer(torch.device("cpu"), clock=clock)
    for rows, blend in ((8, False), (512, False), (8, True)):
        timer.start(rows=rows, blend=blend)
        timer.stop(rows=rows, blend=blend, kept=rows)
    assert [(s.rows, s.blend) for s in timer.take()] == [(512, False), (8, True)]
    # A decode step is not even begun: no clock read (on CUDA, no event recorded).
    assert len(reads) == 4


def test_recomputing_every_row_never_blends_even_before_measuring():
    """At a share of 1.0 every row is computed anyway: loading chunk KV only adds work, and
    the Blend step leaves vLLM's compiled path. A plain prefill is the same answer, faster."""
    fresh = BlendPayPolicy(PRE)
    decision = fresh.decide(4096, 4000, 1.0)
    assert not decision.blend and decision.reason == "recomputes every row"
    assert not _policy(26e-6, 0.0).decide(8192, 7000, 1.0).blend
    assert BlendPayPolicy(PRE, enabled=False).decide(4096, 4000, 1.0).blend  # "always" still blends


def test_a_host_bound_prefill_is_not_priced_per_row():
    """Qwen2.5-0.5B on an H100 (measured, vLLM compiled): a plain prefill costs 11.8 / 12.7 /
    13.2 ms at 1.1K / 2.1K / 4.2K rows, 23.5 ms at 8.3K. Most of a small step is per-step
    host work, so a price per row learned on small steps made an 8K prefill look 4-6x
    dearer than it is, and the policy blended where Blend lost (0.35x)."""
    policy = BlendPayPolicy(PRE)
    for rows, ms in ((1120, 11.8), (2144, 12.7), (4192, 13.2)):
        for _ in range(2):
            policy.observe(StepSample(rows=rows, seconds=ms / 1e3))
    est = policy.plain_seconds(8288)
    assert 0.0132 <= est <= 1.2 * 0.0235
    # 8B-like on the same sizes stays priced near its measured 216 ms.
    big = BlendPayPolicy(PRE)
    for rows, ms in ((1120, 29.9), (2144, 52.9), (4192, 101.1)):
        big.observe(StepSample(rows=rows, seconds=ms / 1e3))
    assert abs(big.plain_seconds(8288) - 0.216) / 0.216 < 0.15


def test_chunks_are_worth_saving_only_where_reusing_them_could_ever_pay():
    """A chunk's save costs its request time (a cold prompt through ucm was 0.48-0.76x a plain
    prefill on a 0.5B model); where even reusing every chunk token would stay far dearer than a
    plain prefill, the save buys nothing. 'Far': beyond the re-measuring slack, so a request the
    policy may still re-measure keeps its chunks."""
    assert BlendPayPolicy(PRE).worth_saving(8192, 8192, 0.15)  # nothing measured yet
    assert BlendPayPolicy(PRE, enabled=False).worth_saving(1024, 1000, 0.15)  # pay_policy: always
    big = _policy(26e-6, 0.020)  # 8B-like: 8K pays, 1K does not, but not by much
    assert big.worth_saving(8192, 8000, 0.15) and big.worth_saving(1024, 1000, 0.15)
    small = _policy(2.5e-6, 0.050)  # 0.5B-like: an 8K prefill ~20 ms, Blend's fixed cost 50 ms
    assert not small.worth_saving(8192, 8000, 0.15)
    assert not small.worth_saving(1024, 1000, 0.0)
    assert not small.worth_saving(8192, 8000, 1.0)  # recomputing every row never pays


def test_a_near_tie_at_a_size_with_few_plain_samples_measures_plain_first():
    """8B shape on an H100 at ~1.1K tokens: the plain price came from one slow plain step at
    that size (42 ms estimated, ~20 ms real), Blend looked 20% cheaper, and the blended
    requests were 0.73-0.93x a plain prefill. Where the estimates are close and fewer than
    ``explore`` plain steps of this size were measured, the request runs plain ("measuring
    plain"): a plain run is never slower than vLLM alone, and it prices the size. At most
    ``explore`` such runs per size, however many requests arrive before their samples do."""
    policy = BlendPayPolicy(PRE, explore=3)
    for rows, seconds in ((2144, 0.043), (4192, 0.095), (8288, 0.204)):
        for _ in range(3):
            policy.observe(StepSample(rows=rows, seconds=seconds))
    policy.observe(StepSample(rows=1120, seconds=0.060))  # one slow first step at ~1.1K
    for _ in range(3):
        policy.observe(StepSample(rows=4192, blend=True, kept=900, seconds=0.040))
    first = policy.decide(1120, 1024, 0.15)
    assert not first.blend and first.reason == "measuring plain"
    assert policy.decide(1120, 1024, 0.15).reason == "measuring plain"  # the second of the three
    for _ in range(2):  # the two plain runs report their (real) cost
        policy.observe(StepSample(rows=1120, seconds=0.021))
    settled = policy.decide(1120, 1024, 0.15)
    assert settled.reason == "does not pay" and settled.plain_ms < 30
    # Far from a tie, Blend is not held back by a sparse size: 8K stays "pays" at once.
    assert policy.decide(8288, 8192, 0.15).reason == "pays"


def test_measuring_plain_asks_no_more_runs_than_explore_while_samples_are_in_flight():
    policy = BlendPayPolicy(PRE, explore=3)
    policy.observe(StepSample(rows=4096, seconds=0.100))
    for _ in range(3):
        policy.observe(StepSample(rows=4096, blend=True, kept=800, seconds=0.075))
    reasons = [policy.decide(4096, 3500, 0.15).reason for _ in range(6)]
    assert reasons == ["measuring plain"] * 2 + ["pays"] * 4


def test_a_pays_priced_from_other_sizes_measures_plain_first_however_wide_the_gap():
    """0.5B shape on an H100 at ~8.3K tokens: the only plain steps were the ~550-row chunk
    precomputes (3 ms each, mostly per-step overhead), so the 8K plain price was extrapolated
    per row to ~45 ms; a Blend step cost ~20 ms, and Blend "paid" by 2x. The plain forward
    really cost ~14.5 ms: the blended requests were 0.79x a plain prefill. A "pays" at a size
    without ``explore`` plain steps of its own runs plain first, however wide the estimated
    gap: a plain run is never slower than vLLM alone, and it prices the size."""
    policy = BlendPayPolicy(PRE, explore=3)
    for _ in range(16):  # chunk precomputes: the only plain steps so far
        policy.observe(StepSample(rows=550, seconds=0.003))
    for _ in range(3):
        policy.observe(StepSample(rows=8288, blend=True, kept=1300, seconds=0.020))
    first = policy.decide(8288, 8192, 0.15)
    assert not first.blend and first.reason == "measuring plain"
    assert first.plain_ms > 2 * first.blend_ms  # the estimated gap was wide
    policy.observe(StepSample(rows=8288, seconds=0.0145))  # the plain run reports its real cost
    settled = policy.decide(8288, 8192, 0.15)
    assert not settled.blend and settled.plain_ms < 16


def test_a_step_is_timed_from_its_load_setup_not_from_its_forward():
    """A Blend step's load setup (store reads, index rows, the copies' launches: 1.2-2.9 ms of
    host time at 8K on the H100 host) runs before the forward, and a plain prefill has none.
    Timed from the forward alone, Blend looked that much cheaper than it was; the connector
    marks the step's start where its load setup begins. A step the policy ignores drops the
    mark, so a later step is never timed from an old one."""
    import torch

    from ucm.engine.step_timer import ForwardTimer

    now = [0.0]
    timer = ForwardTimer(torch.device("cpu"), clock=lambda: now[0])
    timer.mark()  # start_load_kv of a Blend step: t = 0
    now[0] = 0.003  # the forward begins after 3 ms of load setup
    timer.start(rows=4096, blend=True)
    now[0] = 0.020
    timer.stop(rows=4096, blend=True, kept=600)
    timer.mark()  # a decode step with a plan (say, a save): ignored by the policy
    now[0] = 0.030
    timer.start(rows=8)
    timer.stop(rows=8)
    now[0] = 0.040  # a plain prefill without a plan: timed from its forward
    timer.start(rows=4096)
    now[0] = 0.055
    timer.stop(rows=4096)
    timer.mark()  # a step with a plan but no forward (vLLM's no-forward connector step)
    timer.drop_mark()  # its end (wait_for_save)
    now[0] = 0.060
    timer.start(rows=4096)
    now[0] = 0.070
    timer.stop(rows=4096)
    samples = timer.take()
    assert [(s.blend, round(s.seconds, 6)) for s in samples] == [(True, 0.020), (False, 0.015), (False, 0.010)]
