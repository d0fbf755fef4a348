"""Planner (``splitserve plan``), profiles, and the automatic ratio controller.

The workload-shift test is a DISCRETE-EVENT SIMULATION driven by profile numbers (no processes, no
real workers): it shows that the controller moves the prefill:decode ratio the right way when the
workload turns from prefill-heavy to decode-heavy, and that SLO attainment then beats every fixed
ratio of the same number of workers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from splitserve.cli import build_parser
from splitserve.router import planner_cli
from splitserve.router.planner import (
    AutoRatioController,
    ClusterSimulator,
    Profile,
    Slo,
    Switch,
    Workload,
    decode_mean_batch,
    decode_tpot_p90,
    plan,
    poisson_arrivals,
    prefill_ttft_p90,
    slo_attainment,
)

# A GPU-like profile: prefill ~20k tokens/s plus 10 ms overhead; decode step 15 ms + 0.2 ms per request.
PROFILE_DICT = {
    "prefill": [{"input_len": 128, "latency_s": 0.0164}, {"input_len": 4096, "latency_s": 0.2148}],
    "decode": [{"batch_size": 1, "tpot_s": 0.0152}, {"batch_size": 256, "tpot_s": 0.0662}],
    "max_batch_size": 256,
}
SLO = Slo(ttft_p90_s=0.5, tpot_p90_s=0.03)
PREFILL_HEAVY = Workload.uniform(16.0, 2000, 16)
DECODE_HEAVY = Workload.uniform(16.0, 100, 400)


@pytest.fixture()
def profile():
    return Profile.from_dict(PROFILE_DICT)


# ---------------------------------------------------------------------------------------------- profile


def test_profile_interpolates_and_extrapolates(profile):
    assert profile.prefill_time(128) == pytest.approx(0.0164)
    assert profile.prefill_time(2112) == pytest.approx((0.0164 + 0.2148) / 2)
    assert profile.prefill_time(8064) == pytest.approx(0.2148 + (0.2148 - 0.0164))  # linear beyond the end
    assert profile.decode_step(0) == profile.decode_step(1) == pytest.approx(0.0152)
    assert Profile.from_dict(profile.to_dict()) == profile


@pytest.mark.parametrize(
    "bad",
    [
        {"prefill": [], "decode": PROFILE_DICT["decode"]},
        {"prefill": PROFILE_DICT["prefill"], "decode": [{"batch_size": 1, "tpot_s": -1.0}]},
        {"prefill": [{"input_len": 1}], "decode": PROFILE_DICT["decode"]},
        {**PROFILE_DICT, "extra": 1},
        {**PROFILE_DICT, "prefill": [{"input_len": 5, "latency_s": 0.1}, {"input_len": 5, "latency_s": 0.2}]},
    ],
)
def test_profile_rejects_malformed_input(bad):
    with pytest.raises(ValueError):
        Profile.from_dict(bad)


# ---------------------------------------------------------------------------------------------- analytic model


def test_prefill_ttft_grows_with_load_and_diverges_at_saturation(profile):
    service = profile.prefill_time(2000)
    low, mid = (prefill_ttft_p90(profile, PREFILL_HEAVY, r) for r in (0.01, 0.7 / service))
    assert low == pytest.approx(service)  # an idle worker: TTFT is the prefill time
    assert mid > 2 * service
    assert math.isinf(prefill_ttft_p90(profile, PREFILL_HEAVY, 1.0 / service))


def test_decode_batch_follows_littles_law(profile):
    rate = 2.0
    b = decode_mean_batch(profile, DECODE_HEAVY, rate)
    assert b == pytest.approx(rate * 399 * profile.decode_step(b), rel=1e-6)
    assert math.isinf(decode_tpot_p90(profile, DECODE_HEAVY, 100.0))  # past max_batch_size
    assert decode_tpot_p90(profile, DECODE_HEAVY, 4.0) > decode_tpot_p90(profile, DECODE_HEAVY, 1.0)


def test_plan_moves_ratio_towards_the_heavy_phase(profile):
    pre, dec = plan(profile, PREFILL_HEAVY, SLO), plan(profile, DECODE_HEAVY, SLO)
    assert pre.feasible and dec.feasible
    assert pre.ratio > 1.0 > dec.ratio
    assert pre.n_prefill > dec.n_prefill and pre.n_decode < dec.n_decode
    assert pre.predicted_ttft_p90_s <= SLO.ttft_p90_s and dec.predicted_tpot_p90_s <= SLO.tpot_p90_s
    # fewer workers of the heavy role would miss the SLO
    assert prefill_ttft_p90(profile, PREFILL_HEAVY, PREFILL_HEAVY.rate / (pre.n_prefill - 1)) > SLO.ttft_p90_s
    assert decode_tpot_p90(profile, DECODE_HEAVY, DECODE_HEAVY.rate / (dec.n_decode - 1)) > SLO.tpot_p90_s


def test_plan_with_a_fixed_budget_and_infeasible_cases(profile):
    fixed = plan(profile, PREFILL_HEAVY, SLO, total_workers=8)
    assert fixed.n_prefill + fixed.n_decode == 8 and fixed.n_prefill > fixed.n_decode and fixed.feasible
    too_few = plan(profile, PREFILL_HEAVY, SLO, total_workers=2)
    assert not too_few.feasible and too_few.notes
    hopeless = plan(profile, Workload.uniform(1.0, 100_000, 4), SLO)
    assert not hopeless.feasible and "TTFT" in hopeless.notes[0]
    with pytest.raises(ValueError):
        plan(profile, PREFILL_HEAVY, SLO, total_workers=1)
    with pytest.raises(ValueError):
        Workload.uniform(math.inf, 10, 10)


# ---------------------------------------------------------------------------------------------- controller


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_controller_needs_a_streak_and_respects_cooldown():
    clock = FakeClock()
    ctl = AutoRatioController(SLO, band=0.1, streak=3, cooldown_s=60, clock=clock)
    ttft_bad, tpot_ok = 1.0, 0.01  # prefill starved, decode has slack
    assert ctl.observe(ttft_bad, tpot_ok, 2, 2) is None
    assert ctl.observe(ttft_bad, tpot_ok, 2, 2) is None
    sw = ctl.observe(ttft_bad, tpot_ok, 2, 2)
    assert sw == Switch("decode", "prefill", sw.reason) and "TTFT" in sw.reason
    for _ in range(5):  # still bad, but within the cooldown
        clock.t += 10
        assert ctl.observe(ttft_bad, tpot_ok, 3, 1) is None
    clock.t += 20  # cooldown over; decode pool is at its minimum, so no switch either
    assert ctl.observe(ttft_bad, tpot_ok, 3, 1) is None


def test_controller_does_not_flap_on_noise_or_inside_the_band():
    clock = FakeClock()
    ctl = AutoRatioController(SLO, band=0.1, streak=2, cooldown_s=0, clock=clock)
    # alternating pressure: never two windows in a row wanting the same switch
    for i in range(20):
        clock.t += 5
        ttft, tpot = (1.0, 0.01) if i % 2 else (0.1, 0.06)
        assert ctl.observe(ttft, tpot, 2, 2) is None
    # inside the dead band (TTFT slightly above the SLO): no switch however long it lasts
    for _ in range(20):
        assert ctl.observe(0.52, 0.01, 2, 2) is None
    # both SLOs missed: moving a worker cannot help, no switch
    for _ in range(5):
        assert ctl.observe(1.0, 0.06, 2, 2) is None
    # a window without data resets the streak
    assert ctl.observe(0.1, 0.06, 2, 2) is None
    assert ctl.observe(None, 0.06, 2, 2) is None
    assert ctl.observe(0.1, 0.06, 2, 2) is None
    sw = ctl.observe(0.1, 0.06, 2, 2)
    assert sw is not None and (sw.from_role, sw.to_role) == ("prefill", "decode") and "TPOT p90 60.0 ms" in sw.reason


def test_controller_validates_arguments():
    with pytest.raises(ValueError):
        AutoRatioController(SLO, band=1.5)
    with pytest.raises(ValueError):
        AutoRatioController(SLO, streak=0)
    with pytest.raises(ValueError):
        Slo(0.0, 0.1)


# ---------------------------------------------------------------------------------------------- simulation


def _simulate(profile, n_prefill, n_decode, requests, auto=False):
    sim = ClusterSimulator(profile, n_prefill, n_decode, window_s=5.0)
    if auto:
        sim.controller = AutoRatioController(SLO, band=0.1, streak=2, cooldown_s=15.0, clock=sim.clock)
    done = sim.run(requests)
    assert all(r.finish is not None and r.tokens == r.output_len for r in done)  # every request finished
    return slo_attainment(done, SLO), sim.history


def test_simulation_matches_plan_for_a_steady_workload(profile):
    """Simulation: the planned split meets the SLO for most requests; one decode worker fewer does not."""
    p = plan(profile, DECODE_HEAVY, SLO)
    reqs = lambda: poisson_arrivals([(60.0, DECODE_HEAVY)], seed=2)  # noqa: E731
    good, _ = _simulate(profile, p.n_prefill, p.n_decode, reqs())
    short, _ = _simulate(profile, p.n_prefill, p.n_decode - 1, reqs())
    assert good >= 0.9 > short


def test_simulated_workload_shift_auto_ratio_beats_every_fixed_ratio(profile):
    """SIMULATION (discrete events, profile-driven; no processes): 4 workers, 120 s prefill-heavy
    (2000 in / 16 out) then 240 s decode-heavy (100 in / 400 out), 16 req/s throughout."""
    phases = [(120.0, PREFILL_HEAVY), (240.0, DECODE_HEAVY)]
    auto, history = _simulate(profile, 3, 1, poisson_arrivals(phases, seed=1), auto=True)
    # the ratio moves towards decode after the shift (t = 120 s), never before it, and ends at 1:3
    assert history[0] == (0.0, 3, 1) and history[-1][1:] == (1, 3)
    assert all(t > 120.0 for t, _, _ in history[1:])
    assert all(a[1] >= b[1] for a, b in zip(history, history[1:]))  # monotone: no flapping back
    fixed = {(n, 4 - n): _simulate(profile, n, 4 - n, poisson_arrivals(phases, seed=1))[0] for n in (1, 2, 3)}
    assert auto > 0.8
    assert all(auto > f + 0.3 for f in fixed.values()), (auto, fixed)


# ---------------------------------------------------------------------------------------------- CLI


def test_plan_cli_json(tmp_path, capsys):
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps(PROFILE_DICT))
    argv = ["plan", "--profile", str(prof), "--request-rate", "16", "--input-len", "100", "--output-len", "400",
            "--slo-ttft-ms", "500", "--slo-tpot-ms", "30", "--simulate-s", "20", "--json"]
    rc = planner_cli.main(build_parser(argv).parse_args(argv))
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["plan"]["n_decode"] > out["plan"]["n_prefill"] and out["plan"]["feasible"]
    assert out["simulation"]["requests"] > 0 and 0.0 <= out["simulation"]["slo_attainment"] <= 1.0

    wl = tmp_path / "wl.json"
    wl.write_text(json.dumps({"rate": 16, "input_lens": [1800, 2200], "output_lens": [8, 24]}))
    argv = ["plan", "--profile", str(prof), "--workload", str(wl), "--slo-ttft-ms", "500", "--slo-tpot-ms", "30"]
    rc = planner_cli.main(build_parser(argv).parse_args(argv))
    text = capsys.readouterr().out
    assert rc == 0 and "recommended:" in text and "prefill + 1 decode" in text


def test_plan_cli_is_torch_free(tmp_path):
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps(PROFILE_DICT))
    code = (
        "import sys; from splitserve.cli import main; "
        f"rc = main(['plan', '--profile', {str(prof)!r}, '--request-rate', '1', '--input-len', '10', "
        "'--output-len', '10', '--slo-ttft-ms', '500', '--slo-tpot-ms', '30']); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "recommended:" in proc.stdout
