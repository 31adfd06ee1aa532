"""The blind listening test: its design, votes, statistics and CLI, on a fake compare output
(report.json and tiny WAV files written here), and once on a real compare's audio."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import stat
import threading
import wave
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from conftest import MICRO, album_names, scale_notes, write_midi

from mehldau.cli.listen import main as listen
from mehldau.errors import UserError
from mehldau.evaluation import listening
from mehldau.evaluation.features import read_notes
from mehldau.evaluation.listening import (
    ANCHOR,
    PROMPT,
    REFERENCE,
    BlindTest,
    read_votes,
    summarize,
    wilson,
)
from mehldau.evaluation.report import SOUNDFONTS, excerpt_midi

BRANCHES = ["prod", "perc"]
HAS_AUDIO = shutil.which("fluidsynth") is not None and any(Path(f).is_file() for f in SOUNDFONTS)
PROMPTS = ["p00", "p01"]


def _wav(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 80)


def fake_compare(root: Path, systems=(*BRANCHES, REFERENCE, ANCHOR, PROMPT),
                 prompts=PROMPTS) -> Path:
    table = {b: {"kind": "branch"} for b in BRANCHES}
    table["human"] = {"kind": "ceiling"}
    report = {"prompts": [{"name": p, "source": f"/nowhere/{p}.mid"} for p in prompts],
              "table": table, "seed": 3, "git_revision": "abc123",
              "config": {"seed": 3, "prompt_seconds": 2, "seconds": 4}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "report.json").write_text(json.dumps(report))
    for s in systems:
        for p in prompts:
            _wav(root / "audio" / s / f"{p}.wav")
    return root


@pytest.fixture
def test(tmp_path) -> BlindTest:
    return BlindTest.open(fake_compare(tmp_path / "cmp"))


def design(branches=BRANCHES, prompts=PROMPTS) -> set[str]:
    pairs = [*combinations(branches, 2), *((b, REFERENCE) for b in branches),
             (ANCHOR, REFERENCE)]
    return {f"{p}:{'|'.join(sorted(xy))}" for p in prompts for xy in pairs}


# --- the design -----------------------------------------------------------------------------
def test_every_pair_of_the_design_is_a_trial_and_only_where_audio_exists(test, tmp_path) -> None:
    assert test.systems == [*BRANCHES, REFERENCE, ANCHOR] and test.prompts == PROMPTS
    assert (test.seed, test.git_revision) == (3, "abc123")
    trials = test.trials("ann")
    assert len(trials) == len(design()) and {t.id for t in trials} == design()
    assert "p00:anchor|pianist" in {t.id for t in trials}
    for t in trials:
        assert t.prompt_wav == test.dir / "audio" / PROMPT / f"{t.prompt}.wav"
        assert t.a.system != t.b.system and t.a.prompt == t.b.prompt == t.prompt
        for clip in (t.a, t.b):
            assert clip.wav == test.dir / "audio" / clip.system / f"{t.prompt}.wav"
            assert clip.wav.is_file()
    # a branch without audio for one prompt: its pairs on that prompt are left out
    (test.dir / "audio" / "perc" / "p01.wav").unlink()
    ids = {t.id for t in BlindTest.open(test.dir).trials("ann")}
    assert ids == design() - {"p01:perc|prod", "p01:perc|pianist"}
    # without an anchor: no anchor trials, the rest unchanged
    shutil.rmtree(test.dir / "audio" / ANCHOR)
    reopened = BlindTest.open(test.dir)
    assert ANCHOR not in reopened.systems
    assert {t.id for t in reopened.trials("ann")} == ids - {"p00:anchor|pianist",
                                                            "p01:anchor|pianist"}


def test_trials_are_deterministic_per_listener_and_differ_between_listeners(test) -> None:
    first = test.trials("ann")
    assert first == test.trials("ann") == BlindTest.open(test.dir).trials("ann")
    # 40 listeners: the salt is new in every test run, and with it all ten pairs are heard
    # both ways round by someone except once in about 10^11 runs
    others = {f"l{k}": test.trials(f"l{k}") for k in range(39)}
    for trials in others.values():  # ids name the pair, not the sides: the same for all
        assert sorted(t.id for t in trials) == sorted(t.id for t in first)
    sides = {name: {t.id: t.a.system for t in trials} for name, trials in
             [("ann", first), *others.items()]}
    # each pair is heard with A and B both ways by someone; orders differ between listeners
    assert all(len({s[i] for s in sides.values()}) == 2 for i in design())
    # 8 trials: 8! orders x 2^8 sides; two of 40 listeners share one about once in 13,000
    # test runs, which is allowed (orders alone: once in 50, which made `== 40` flaky);
    # two such coincidences in one run: less than once in 10^8
    heard = {tuple((t.id, t.a.system) for t in trials) for trials in [first, *others.values()]}
    assert len(heard) >= 39


def _seed_prediction(test: BlindTest, listener: str) -> list[str]:
    """Order and sides as the page once drew them, from report.json's seed and the listener:
    what anyone holding report.json could work out."""
    rng = random.Random(f"mehldau-listen:{test.seed}:{listener}")
    order = [(p, x, y) for p, x, y in test._pairs]
    rng.shuffle(order)
    return [f"{p}:{y}>{x}" if rng.random() < 0.5 else f"{p}:{x}>{y}" for p, x, y in order]


def _served(trials) -> list[str]:
    return [f"{t.prompt}:{t.a.system}>{t.b.system}" for t in trials]


def test_sides_and_order_come_from_a_secret_salt_not_from_report_json(tmp_path) -> None:
    one = BlindTest.open(fake_compare(tmp_path / "one"))
    two = BlindTest.open(fake_compare(tmp_path / "two"))  # the same report.json, byte for byte
    assert (one.dir / "report.json").read_bytes() == (two.dir / "report.json").read_bytes()
    names = ["ann", "bob", "cyd", "dee", "eve", "fay"]
    for name in names:
        served = _served(one.trials(name))
        assert served != _seed_prediction(one, name)  # the seed does not predict it...
        assert served != _served(two.trials(name))    # ...nor does the same report elsewhere
    salt = one.dir / "listening" / "salt"
    assert stat.S_IMODE(salt.stat().st_mode) == 0o600
    secret = salt.read_text().strip()
    assert len(secret) == 64 and secret not in (one.dir / "report.json").read_text()
    # a resuming listener gets the same trials, whatever report.json's seed says
    before = {name: one.trials(name) for name in names}
    report = json.loads((one.dir / "report.json").read_text())
    (one.dir / "report.json").write_text(json.dumps({**report, "seed": 99}))
    again = BlindTest.open(one.dir)
    assert again.seed == 99 and all(again.trials(n) == before[n] for n in names)


def test_pages_opening_a_test_together_agree_on_one_salt(tmp_path) -> None:
    root = fake_compare(tmp_path / "cmp")
    drawn: list = []

    def draw() -> None:
        drawn.append(_served(BlindTest.open(root).trials("ann")))

    threads = [threading.Thread(target=draw) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(drawn) == 8 and all(d == drawn[0] for d in drawn)
    assert sorted(os.listdir(root / "listening")) == ["salt"]  # no temp file left behind


def test_codes_are_issued_by_the_test_recorded_hashed_and_checked(test) -> None:
    code = test.issue_codes(1)[0]
    assert re.fullmatch(r"[0-9a-f]{4}(-[0-9a-f]{4}){3}", code)
    listener = test.listener_for(code)
    assert listener == listening.listener_of(code) and len(listener) == 12
    assert test.listener_for(f"  {code.upper().replace('-', ' ')} ") == listener  # as typed
    registry = test.codes_path.read_text()
    assert code not in registry and code.replace("-", "") not in registry  # only its hash
    assert json.loads(registry)["by"] == "page" and not test.invite_only
    for bad in ("0000-0000-0000-0000", "ann", "", code[:-1] + "x", listener):
        with pytest.raises(UserError, match="not a listener code of this test") as e:
            test.listener_for(bad)
        assert "\n" not in str(e.value)
    # the code of another test does not open this one
    other = BlindTest.open(fake_compare(test.dir.parent / "other"))
    with pytest.raises(UserError, match="not a listener code"):
        other.listener_for(code)


def test_invite_only_refuses_page_codes_and_minting(test) -> None:
    early = test.issue_codes(1, "page")[0]
    invited = test.issue_codes(3, "operator", invite_only=True)
    assert test.invite_only and len(set(invited)) == 3
    assert all(test.listener_for(c) == listening.listener_of(c) for c in invited)
    with pytest.raises(UserError, match="invite-only now"):
        test.listener_for(early)
    with pytest.raises(UserError, match="invite-only"):
        test.issue_codes(1, "page")
    assert len(test.codes_path.read_text().splitlines()) == 5  # 1 + 3 codes + the switch


def test_open_refuses_what_is_not_a_test(tmp_path) -> None:
    def err(path) -> str:
        with pytest.raises(UserError) as e:
            BlindTest.open(path)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "does not exist" in err(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no report.json" in err(tmp_path / "empty")
    assert "rerun mehldau-compare" in err(fake_compare(tmp_path / "silent", systems=()))
    assert "needs two systems" in err(fake_compare(tmp_path / "one",
                                                   systems=(REFERENCE, ANCHOR, PROMPT)))
    assert "prepare" in err(fake_compare(tmp_path / "old", systems=(*BRANCHES, REFERENCE)))


# --- votes ----------------------------------------------------------------------------------
def test_record_stores_the_mapping_and_remaining_resumes(test) -> None:
    trials = test.remaining("ann")
    assert trials == test.trials("ann")
    t = trials[0]
    vote = test.record("ann", t, "B", 4, {"prompt": 2.0, "A": 4.0, "B": 3.5})
    assert (vote["a"], vote["b"], vote["winner"]) == (t.a.system, t.b.system, t.b.system)
    assert vote["trial"] == t.id and vote["git_revision"] == "abc123"
    assert "seed" not in vote  # the report's seed decides nothing a vote should record
    assert vote["listened"] == {"prompt": 2.0, "A": 4.0, "B": 3.5} and vote["time"].endswith(
        "+00:00")
    lines = test.votes_path.read_text().splitlines()
    assert [json.loads(x) for x in lines] == [vote]
    test.record("ann", trials[1], "none", None, {})
    assert test.record("ann", trials[2], "A", 2.0, {})["rating"] == 2  # a slider's float
    # another page (a new BlindTest) resumes where the listener stopped; others unaffected
    assert BlindTest.open(test.dir).remaining("ann") == trials[3:]
    assert test.remaining("bob") == test.trials("bob")
    with pytest.raises(UserError, match="already voted"):
        test.record("ann", t, "A", None, {})
    votes, skipped = read_votes(test.votes_path)
    assert len(votes) == 3 and not skipped and votes[1]["winner"] is None


@pytest.mark.parametrize("choice,rating,listened,msg", [
    ("a", None, {}, "choice must be"), ("A", 0, {}, "rating"), ("A", 6, {}, "rating"),
    ("A", True, {}, "rating"), ("A", 2.5, {}, "rating"), ("none", 3, {}, "rating is of"),
    ("A", None, {"C": 1.0}, "listened"), ("A", None, {"A": -1.0}, "seconds >= 0")])
def test_record_refuses_bad_votes_in_one_line(test, choice, rating, listened, msg) -> None:
    with pytest.raises(ValueError, match=msg) as e:
        test.record("ann", test.trials("ann")[0], choice, rating, listened)
    assert "\n" not in str(e.value) and not test.votes_path.exists()


def test_record_refuses_a_trial_of_another_test(test) -> None:
    t = test.trials("ann")[0]
    forged = listening.Trial(t.id, "p09", t.prompt_wav, t.a, t.b)
    with pytest.raises(ValueError, match="not one of this test"):
        test.record("ann", forged, "A", None, {})


def test_concurrent_appends_are_whole_lines(test) -> None:
    trial = test.trials("x")[0]

    def vote(k: int) -> None:
        for j in range(20):
            test.record(f"t{k}-{j}", trial, "AB"[j % 2], 1 + j % 5, {"A": 1.0})

    threads = [threading.Thread(target=vote, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    lines = test.votes_path.read_text().splitlines()
    assert len(lines) == 160 and all(json.loads(x)["trial"] == trial.id for x in lines)
    votes, skipped = read_votes(test.votes_path)
    assert len(votes) == 160 and not skipped
    assert len({v["listener"] for v in votes}) == 160


def test_concurrent_second_votes_and_codes_lose_nothing_and_double_nothing(test) -> None:
    """Eight windows of one listener vote on one trial at once: one vote is kept; eight
    pages mint codes at once: every code is recorded, once."""
    trial = test.trials("ann")[0]
    outcome: list[str] = []
    codes: list[str] = []

    def vote(k: int) -> None:
        try:
            test.record("ann", trial, "AB"[k % 2], None, {})
            outcome.append("saved")
        except listening.AlreadyVoted:
            outcome.append("refused")
        codes.extend(test.issue_codes(20))

    threads = [threading.Thread(target=vote, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(outcome) == ["refused"] * 7 + ["saved"]
    assert len(test.votes_path.read_text().splitlines()) == 1
    assert len(codes) == len(set(codes)) == 160
    assert len(test.codes_path.read_text().splitlines()) == 160
    assert {test.listener_for(c) for c in codes} == {listening.listener_of(c) for c in codes}


def test_read_votes_skips_bad_lines_with_a_reason(test) -> None:
    t = test.trials("ann")
    good = test.record("ann", t[0], "A", None, {})
    with open(test.votes_path, "a") as f:
        f.write("not json\n")
        f.write(json.dumps({"listener": "bob"}) + "\n")
        f.write(json.dumps({**good, "winner": "nobody"}) + "\n")
        f.write(json.dumps(good) + "\n")  # a second vote pasted in by hand
        f.write('{"listener": "torn')  # a write cut short: no newline
    second = test.record("ann", t[1], "B", 2, {})  # starts a line of its own
    votes, skipped = read_votes(test.votes_path)
    assert votes == [good, second]
    assert [s.split("skipped: ")[1][:12] for s in skipped] == [
        "not JSON (a ", "missing tria", "choice and w", "a second vot", "not JSON (a "]
    assert read_votes(test.dir / "none.jsonl") == ([], [])


# --- statistics -----------------------------------------------------------------------------
def test_wilson_interval_known_values() -> None:
    lo, hi = wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    lo, hi = wilson(50, 100)
    assert (round(lo, 3), round(hi, 3)) == (0.404, 0.596)
    assert wilson(0, 10)[0] == pytest.approx(0.0) and wilson(10, 10)[1] == pytest.approx(1.0)
    assert wilson(0, 0) is None


def _vote(listener, prompt, a, b, winner, rating=None) -> dict:
    choice = "A" if winner == a else "B" if winner == b else "none"
    return {"listener": listener, "trial": f"{prompt}:{'|'.join(sorted((a, b)))}",
            "prompt": prompt, "a": a, "b": b, "choice": choice, "winner": winner,
            "rating": rating}


TRUTH = {"prod": -0.5, "perc": -1.0, REFERENCE: 0.0, ANCHOR: -2.5}
SD = 0.5  # spread of listeners' and of prompts' own log-strengths, per system


def _design_pairs(names) -> list[tuple[str, str]]:
    branches = [s for s in names if s not in (REFERENCE, ANCHOR)]
    return [*combinations(branches, 2), *((b, REFERENCE) for b in branches), (ANCHOR, REFERENCE)]


def simulate(truth: dict[str, float], listeners: int, prompts: int, seed: int,
             sd_listener: float = SD, sd_prompt: float = SD) -> list[dict]:
    """Votes on the test's design, one per pair, listener and prompt. Each listener hears each
    system with log-strength truth + their own offset + the prompt's offset (normal, sd
    `sd_listener` and `sd_prompt`): listeners differ in taste and prompts in how well each
    system continues them, so votes of one listener or on one prompt are not independent."""
    rng = np.random.default_rng(seed)
    names = list(truth)
    base = np.array([truth[s] for s in names])
    own = rng.normal(0.0, sd_listener, (listeners, len(names)))
    per_prompt = rng.normal(0.0, sd_prompt, (prompts, len(names)))
    votes = []
    for li in range(listeners):
        for p in range(prompts):
            theta = dict(zip(names, base + own[li] + per_prompt[p]))
            for x, y in _design_pairs(names):
                a, b = (x, y) if rng.random() < 0.5 else (y, x)
                p_a = 1 / (1 + math.exp(theta[b] - theta[a]))
                winner = a if rng.random() < p_a else b
                votes.append(_vote(f"l{li}", f"p{p:02d}", a, b, winner,
                                   int(rng.integers(1, 6))))
    return votes


def simulate_wins(truth: dict[str, float], repeats: int, listeners: int, prompts: int,
                  rng: np.random.Generator, sd: float = SD) -> np.ndarray:
    """`simulate`'s tests, `repeats` of them at once, as win matrices per listener and prompt:
    wins[repeat, listener, prompt, i, j], systems in `truth`'s order."""
    names = list(truth)
    k = len(names)
    theta = (np.array([truth[s] for s in names]) + rng.normal(0, sd, (repeats, listeners, 1, k))
             + rng.normal(0, sd, (repeats, 1, prompts, k)))
    wins = np.zeros((repeats, listeners, prompts, k, k))
    for x, y in _design_pairs(names):
        i, j = names.index(x), names.index(y)
        won = rng.random(theta.shape[:-1]) < 1 / (1 + np.exp(theta[..., j] - theta[..., i]))
        wins[..., i, j] += won
        wins[..., j, i] += ~won
    return wins


def population_truth(truth: dict[str, float], sd: float = SD
                     ) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """What the figures estimate, for the whole population of listeners and prompts: each
    pair's win rate averaged over both spreads (Gauss–Hermite), and the Bradley–Terry
    log-strengths (pianist at 0) those rates imply on the design. Averaging over listeners
    pulls rates towards 1/2, so these are smaller than `truth` in size."""
    nodes, weights = np.polynomial.hermite.hermgauss(80)
    spread = math.sqrt(2 * (2 * sd * sd))  # a difference of two systems, both offsets
    names = list(truth)
    wins = np.zeros((len(names), len(names)))
    rates = {}
    for x, y in _design_pairs(names):
        d = truth[x] - truth[y] + math.sqrt(2) * spread * nodes
        rates[(x, y)] = float((weights / (1 + np.exp(-d))).sum() / math.sqrt(math.pi))
        i, j = names.index(x), names.index(y)
        wins[i, j], wins[j, i] = 1e9 * rates[(x, y)], 1e9 * (1 - rates[(x, y)])
    logp = np.log(listening.bradley_terry(wins))
    logp -= logp[names.index(REFERENCE)]
    return dict(zip(names, logp.tolist())), rates


def _rate_of(pair: dict, rates: dict) -> float:
    first, second = pair["first"], pair["second"]
    return rates[(first, second)] if (first, second) in rates else 1 - rates[(second, first)]


def test_bradley_terry_recovers_the_population_strengths_from_simulated_listeners() -> None:
    strength, rates = population_truth(TRUTH)
    # every listener kept: with tastes that vary, an honest one can prefer the anchor in
    # half their anchor trials, and the screen is tested on its own below
    s = summarize(simulate(TRUTH, 30, 10, seed=1), bootstrap=400, seed=0,
                  anchor_threshold=1.01)
    bt = s["main"]["bradley_terry"]
    assert s["flagged"] == [] and s["listeners"] == 30
    assert sorted(bt, key=lambda k: -bt[k]["log_strength"]) == [REFERENCE, "prod", "perc",
                                                                 ANCHOR]
    assert bt[REFERENCE]["log_strength"] == 0.0
    for name, true in strength.items():
        if name != REFERENCE:
            lo, hi = bt[name]["log_strength_ci"]
            assert lo < true < hi, (name, lo, true, hi)
            p = 1 / (1 + math.exp(-true))
            lo, hi = bt[name]["p_beats_pianist_ci"]
            assert lo < p < hi and lo < bt[name]["p_beats_pianist"] < hi
    for pair in s["main"]["pairs"]:  # each pair's interval holds its population rate
        lo, hi = pair["first_win_rate_ci"]
        assert lo < _rate_of(pair, rates) < hi, pair
    rows = s["main"]["systems"]
    assert rows[REFERENCE]["win_rate"] > rows["prod"]["win_rate"] > rows[ANCHOR]["win_rate"]
    lo, hi = rows["prod"]["mean_rating_ci"]  # ratings were uniform on 1..5
    assert lo < 3 < hi and lo < rows["prod"]["mean_rating"] < hi


def test_intervals_cover_the_population_value_95_percent_of_the_time() -> None:
    """Many simulated tests with a known truth (20 listeners, 8 prompts, both spreads 0.5):
    the Bradley–Terry and win-rate intervals, computed as `summarize` computes them, hold the
    population value in 90-99 % of tests. Resampling listeners alone does not, nor does
    Wilson's interval: both miss the prompts' share of the variation (Wilson's the
    listeners' too), which is why the summary resamples both."""
    rng = np.random.default_rng(7)
    repeats, bootstrap, listeners, prompts = 400, 200, 20, 8
    names = list(TRUTH)
    ref = names.index(REFERENCE)
    strength, rates = population_truth(TRUTH)
    wins = simulate_wins(TRUTH, repeats, listeners, prompts, rng)
    point = np.log(listening.bradley_terry(wins.sum((1, 2))))
    point -= point[..., [ref]]
    covered = {}
    for by_prompt in (True, False):
        wl, wp = listening.bootstrap_weights(rng, (repeats, bootstrap), listeners, prompts,
                                             by_prompt)
        boot_wins = listening.resample(wins, wl, wp)
        boot = np.log(listening.bradley_terry(boot_wins))
        boot -= boot[..., [ref]]
        for i, name in enumerate(names):
            if name != REFERENCE:
                covered[by_prompt, name] = np.mean([
                    lo <= strength[name] <= hi for lo, hi in (
                        listening.percentile_interval(boot[r, :, i], point[r, i])
                        for r in range(repeats))])
        games = boot_wins + np.swapaxes(boot_wins, -1, -2)
        for (x, y), true in rates.items():
            i, j = names.index(x), names.index(y)
            covered[by_prompt, f"{x}>{y}"] = np.mean([
                lo <= true <= hi for lo, hi in (
                    listening.rate_interval(boot_wins[r, :, i, j] / games[r, :, i, j],
                                            wins[r, ..., i, j].sum(), listeners * prompts)
                    for r in range(repeats))])
    two_way = {k[1]: round(float(v), 3) for k, v in covered.items() if k[0]}
    alone = {k[1]: round(float(v), 3) for k, v in covered.items() if not k[0]}
    assert all(0.90 <= v <= 0.99 for v in two_way.values()), two_way
    assert all(v < 0.88 for k, v in alone.items() if k in ("prod", "perc")), alone
    for (x, y), true in rates.items():  # nor do Wilson's, which take votes as independent
        i, j = names.index(x), names.index(y)
        by_wilson = np.mean([lo <= true <= hi for lo, hi in (
            wilson(wins[r, ..., i, j].sum(), listeners * prompts) for r in range(repeats))])
        assert by_wilson < 0.88, (x, y, by_wilson)


def test_newton_reaches_hunters_mm_maximum() -> None:
    """The fit against Hunter's (2004) MM iteration, run to convergence, on win matrices
    with a system that never wins, one that always does and pairs never compared."""
    def mm(wins: np.ndarray) -> np.ndarray:
        k = wins.shape[-1]
        w = wins + (1 - np.eye(k)) * listening.PSEUDO_TIE / 2
        n = w + np.swapaxes(w, -1, -2)
        p = np.ones(w.shape[:-1])
        for _ in range(200_000):
            new = w.sum(-1) / (n / (p[..., :, None] + p[..., None, :])).sum(-1)
            new /= np.exp(np.log(new).mean(-1, keepdims=True))
            if np.max(np.abs(np.log(new / p))) < 1e-13:
                break
            p = new
        return new

    rng = np.random.default_rng(3)
    wins = rng.integers(0, 30, (40, 5, 5)) * (rng.random((40, 5, 5)) < 0.6)
    wins[:10, 0, :] = 0       # never wins
    wins[10:20, :, 1] = 0     # never loses
    wins = wins * (1 - np.eye(5))
    fitted = listening.bradley_terry(wins)
    assert np.allclose(np.log(fitted), np.log(mm(wins)), atol=1e-8)
    assert np.allclose(np.log(fitted).sum(-1), 0)  # geometric mean 1


_INTERVAL = re.compile(r"(-?\d+\.\d+) \[(-?\d+\.\d+), (-?\d+\.\d+)\]")


def test_every_interval_the_summary_gives_contains_its_estimate() -> None:
    """Small tests of two to four listeners, where a system's estimate is often the most
    extreme any resample gives (a system that never beats the pianist), so a plain
    percentile interval can end a hair short of it: every interval in summary.json and every
    one printed holds its estimate."""
    checked = 0
    for seed in range(60, 90):
        rng = np.random.default_rng(seed)
        listeners, prompts = int(rng.integers(2, 5)), int(rng.integers(1, 4))
        sd = float(rng.choice([0.0, 1.0, 3.0]))
        truth = {"prod": float(rng.normal(0, 2)), "perc": float(rng.normal(0, 2)),
                 REFERENCE: 0.0, ANCHOR: -4.0}
        votes = simulate(truth, listeners, prompts, seed, sd, sd)
        s = summarize(votes, bootstrap=100, seed=seed, anchor_threshold=0.3)
        for part in (s["main"], s["with_flagged"] or s["main"]):
            rows = [(r["win_rate"], r["win_rate_ci"]) for r in part["systems"].values()]
            rows += [(r["mean_rating"], r["mean_rating_ci"]) for r in part["systems"].values()]
            rows += [(p["first_win_rate"], p["first_win_rate_ci"]) for p in part["pairs"]]
            for r in part["bradley_terry"].values():
                rows += [(r["log_strength"], r["log_strength_ci"]),
                         (r.get("p_beats_pianist"), r.get("p_beats_pianist_ci"))]
            for value, ci in rows:
                if ci is not None:
                    assert ci[0] <= value <= ci[1], (seed, value, ci)
                    checked += 1
        for value, lo, hi in _INTERVAL.findall(listening.format_summary(s)):
            assert float(lo) <= float(value) <= float(hi), (seed, value, lo, hi)
            checked += 1
    assert checked > 1000


def test_a_system_that_always_wins_and_one_that_never_wins_stay_finite() -> None:
    votes = [_vote(f"l{k}", f"p{p}", x, y, x) for k in range(5) for p in range(4)
             for x, y in (("X", "Y"), ("X", REFERENCE), ("Y", REFERENCE))]
    votes = [{**v, "winner": REFERENCE, "choice": "B"} if (v["a"], v["b"]) == ("Y", REFERENCE)
             else v for v in votes]
    s = summarize(votes, bootstrap=200)
    rows, bt = s["main"]["systems"], s["main"]["bradley_terry"]
    assert rows["X"]["win_rate"] == 1.0 and rows["Y"]["win_rate"] == 0.0
    assert rows["X"]["win_rate_ci"] == pytest.approx(wilson(40, 40))
    assert rows["Y"]["wins"] == 0 and rows["Y"]["comparisons"] == 40
    assert bt["X"]["log_strength"] > 0 > bt["Y"]["log_strength"]
    assert all(math.isfinite(bt[k]["log_strength"]) for k in bt)
    assert bt["X"]["p_beats_pianist"] > 0.9 > 0.1 > bt["Y"]["p_beats_pianist"]


def test_a_listener_who_prefers_the_anchor_is_screened_out() -> None:
    truth = {"prod": -0.5, "perc": -1.2, REFERENCE: 0.0, ANCHOR: -3.0}
    honest = simulate(truth, 6, 4, seed=2)
    # a listener who clicks the worse clip: the anchor over the pianist, perc over prod...
    worst = {ANCHOR: 0, "perc": 1, "prod": 2, REFERENCE: 3}
    odd = [{**v, "listener": "odd", "winner": min((v["a"], v["b"]), key=worst.get)}
           for v in honest if v["listener"] == "l0"]
    odd = [{**v, "choice": "A" if v["winner"] == v["a"] else "B"} for v in odd]
    clean = summarize(honest, bootstrap=100)
    s = summarize(honest + odd, bootstrap=100)
    assert clean["flagged"] == [] and s["flagged"] == ["odd"]
    assert s["screening"]["odd"] == {"trials": 4, "anchor_preferred": 4.0, "share": 1.0,
                                      "flagged": True}
    assert s["main"] == clean["main"]  # the main figures are the honest listeners'
    mixed = s["with_flagged"]["systems"]
    assert mixed[ANCHOR]["wins"] == clean["main"]["systems"][ANCHOR]["wins"] + 4
    assert mixed[REFERENCE]["comparisons"] == sum(REFERENCE in (v["a"], v["b"])
                                                  for v in honest + odd)
    text = listening.format_summary(s)
    assert "Set aside" in text and "odd (100% of 4)" in text and "With them included" in text
    # a threshold above what the listener did keeps them
    assert summarize(honest + odd, bootstrap=0, anchor_threshold=1.01)["flagged"] == []


def test_no_votes_one_listener_and_a_system_never_compared() -> None:
    empty = summarize([], bootstrap=10)
    assert empty["votes"] == 0 and "no votes yet" in empty["notes"]
    assert listening.format_summary(empty).startswith("No votes yet")
    votes = [_vote("solo", "p00", "prod", REFERENCE, REFERENCE, 4),
             _vote("solo", "p00", ANCHOR, REFERENCE, REFERENCE),
             _vote("solo", "p01", "prod", REFERENCE, "prod", 2),
             _vote("solo", "p01", ANCHOR, REFERENCE, None)]  # a tie: half a win each
    s = summarize(votes, bootstrap=50, systems=["prod", "perc", REFERENCE, ANCHOR])
    bt, rows = s["main"]["bradley_terry"], s["main"]["systems"]
    assert rows["perc"]["comparisons"] == 0 and rows["perc"]["win_rate"] is None
    assert "perc" not in bt and "never compared: perc" in s["notes"]
    assert bt["prod"]["log_strength_ci"] is None and any("one listener" in n for n in s["notes"])
    assert rows["prod"]["win_rate"] == 0.5 and rows["prod"]["mean_rating"] == 2.0
    assert (rows[ANCHOR]["ties"], rows[ANCHOR]["win_rate"]) == (1, 0.25)
    assert rows[ANCHOR]["win_rate_ci"] == wilson(0.5, 2) and s["flagged"] == []
    text = listening.format_summary(s)
    assert "| perc | 0 | 0 | 0 | n/a |" in text and "prod vs pianist" in text


# --- the CLI --------------------------------------------------------------------------------
def test_cli_prints_win_rates_and_bradley_terry_rows(test, capsys) -> None:
    for name in ("ann", "bob", "cyd"):
        for t in test.trials(name):
            good = {REFERENCE: 3, "prod": 2, "perc": 1, ANCHOR: 0}
            side = "A" if good[t.a.system] > good[t.b.system] else "B"
            test.record(name, t, side, 5, {"prompt": 2.0, "A": 4.0, "B": 4.0})
    assert listen(["summarize", str(test.dir), "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "win rate [95 %]" in out and "BT log-strength" in out
    assert "resamples of listeners and prompts" in out
    assert "| prod | 12 | 6 | 0 | 0.50 [" in out and "| *pianist* | 18 | 18 | 0 | 1.00 [" in out
    assert "| perc vs pianist | 6 | 0 | 6 | 0 |" in out
    saved = json.loads((test.dir / "listening" / "summary.json").read_text())
    assert saved["votes"] == 24 and saved["git_revision"] == "abc123"
    assert saved["main"]["bradley_terry"][REFERENCE]["log_strength"] == 0.0
    assert listen(["summarize", str(test.dir), "--bootstrap", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["votes"] == 24
    assert listen(["-h"]) == 0 and "mehldau-listen summarize DIR" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    def err(args) -> str:
        assert listen(args) == 2
        e = capsys.readouterr().err.strip()
        assert e.startswith("mehldau-listen: error:") and "\n" not in e
        return e

    assert "does not exist" in err(["summarize", str(tmp_path / "nope")])
    (tmp_path / "plain").mkdir()
    assert "not a mehldau-compare output" in err(["summarize", str(tmp_path / "plain")])
    assert "no votes yet" in err(["summarize", str(fake_compare(tmp_path / "cmp"))])
    assert "invalid choice" in err(["judge", str(tmp_path)])
    assert "invalid int" in err(["summarize", str(tmp_path / "cmp"), "--bootstrap", "x"])
    assert "--count must be 1 to 10000" in err(["codes", str(tmp_path / "cmp"), "--count", "0"])
    assert "required" in err(["codes", str(tmp_path / "cmp")])


def test_cli_codes_issues_codes_and_makes_the_test_invite_only(test, capsys) -> None:
    from mehldau.app.listen import open_session

    page_code = test.issue_codes(1)[0]
    assert listen(["codes", str(test.dir), "--count", "3"]) == 0
    captured = capsys.readouterr()
    codes = captured.out.split()
    assert len(codes) == 3 and "invite-only" in captured.err
    assert test.invite_only and all(test.listener_for(c) for c in codes)
    serve = test.dir.parent / "served"
    s = open_session(test, codes[0], "", serve, 1.0)  # an invited listener starts
    assert s.listener == listening.listener_of(codes[0]) and s.trial is not None
    for typed, held, why in (("", "", "invite-only: type the listener code"),
                             (page_code, "", "invite-only now"),
                             ("", page_code, "invite-only now"),
                             ("1234-5678-9abc-def0", "", "not a listener code")):
        with pytest.raises(UserError, match=why):
            open_session(test, typed, held, serve, 1.0)


# --- the clips, rendered --------------------------------------------------------------------
def _notes(path: Path) -> list[tuple[int, int, int, int]]:
    import symusic

    score = symusic.Score(str(path))
    return sorted((n.time, n.duration, n.velocity, n.pitch) for t in score.tracks
                  for n in t.notes)


def _controls(path: Path) -> int:
    import symusic

    return sum(len(t.controls) for t in symusic.Score(str(path)).tracks)


def _seconds(path: Path) -> list[tuple[float, float, int]]:
    """(onset, end, pitch) in seconds, to the millisecond."""
    import symusic

    score = symusic.Score(str(path)).to("second")
    return sorted((round(n.time, 3), round(n.time + n.duration, 3), n.pitch)
                  for t in score.tracks for n in t.notes)


def _expected(notes) -> list[tuple[float, float, int]]:
    """`_seconds` of a clip written from `notes`: a note struck again while it still sounds
    ends at the new stroke."""
    rows = sorted(zip(notes.onset.tolist(), notes.end.tolist(), notes.pitch.tolist()))
    out = []
    for k, (onset, end, pitch) in enumerate(rows):
        again = [o for o, _, p in rows[k + 1:] if p == pitch and o > onset]
        out.append((round(onset, 3), round(min([end, *again]), 3), pitch))
    return sorted(out)


def test_every_clip_is_cut_from_folded_notes_and_written_without_pedal(tmp_path) -> None:
    """A pianist's clip with the sustain pedal renders from a MIDI with no controller events
    and note ends moved to the pedal's lift, exactly as a generated clip whose notes already
    end there: both kinds of clip reach FluidSynth alike. The window is the measured one:
    notes that start in it, from its start."""
    notes = [(60, 0.3, 0.4, 70),   # before the window: left out
             (60, 0.6, 0.2, 80),   # held by the pedal to 1.9, but struck again at 1.2
             (64, 1.0, 0.1, 60),   # held to 1.9
             (60, 1.2, 0.1, 90),   # held to 1.9
             (67, 2.2, 0.3, 70)]   # after the lift: its own length
    pianist = write_midi(tmp_path / "pianist.mid", notes, pedals=[(0.5, 1.4)])
    folded = write_midi(tmp_path / "generated.mid",
                        [(60, 0.6, 1.3, 80), (64, 1.0, 0.9, 60), (60, 1.2, 0.7, 90),
                         (67, 2.2, 0.3, 70)])
    assert _controls(pianist) == 2
    excerpt_midi(pianist, 0.5, 3.0, tmp_path / "p.mid")
    excerpt_midi(folded, 0.5, 3.0, tmp_path / "g.mid")
    assert _controls(tmp_path / "p.mid") == 0
    assert _seconds(tmp_path / "p.mid") == [(0.1, 0.7, 60), (0.5, 1.4, 64), (0.7, 1.4, 60),
                                            (1.7, 2.0, 67)]
    assert (tmp_path / "p.mid").read_bytes() == (tmp_path / "g.mid").read_bytes()
    # the anchor: the pianist's folded notes, pitches shuffled, written the same way
    listening.anchor_midi(tmp_path / "p.mid", tmp_path / "a.mid", seed=3, prompt="p00")
    assert _controls(tmp_path / "a.mid") == 0
    anchor = _seconds(tmp_path / "a.mid")
    assert sorted(p for *_, p in anchor) == [60, 60, 64, 67] and len(anchor) == 4


def test_anchor_keeps_timing_and_shuffles_pitches(tmp_path) -> None:
    src = write_midi(tmp_path / "pianist.mid", scale_notes(24, step=0.25, seed=5))
    listening.anchor_midi(src, tmp_path / "a.mid", seed=3, prompt="p00")
    listening.anchor_midi(src, tmp_path / "b.mid", seed=3, prompt="p00")
    listening.anchor_midi(src, tmp_path / "c.mid", seed=3, prompt="p01")
    real, anchor = _notes(src), _notes(tmp_path / "a.mid")
    timing = [n[:3] for n in real]
    assert sorted(n[:3] for n in anchor) == timing  # onsets, durations, velocities kept
    assert sorted(n[3] for n in anchor) == sorted(n[3] for n in real)  # the same pitches
    assert [n[3] for n in anchor] != [n[3] for n in real]  # ...in another order
    assert _notes(tmp_path / "b.mid") == anchor != _notes(tmp_path / "c.mid")


@pytest.mark.skipif(not HAS_AUDIO, reason="needs fluidsynth and a General MIDI soundfont")
def test_compare_renders_prompt_and_anchor_and_prepare_fills_an_old_output(tmp_path) -> None:
    from mehldau.cli.compare import main as compare
    from mehldau.cli.train import main as train

    data = tmp_path / "data"
    for a, name in enumerate(album_names(data, 4)):
        for k in range(2):  # a pedal over the prompt's cut and one in the continuation
            write_midi(data / name / f"piece {k}.mid",
                       scale_notes(32, base=50 + 2 * a + k, step=0.2, seed=10 * a + k),
                       pedals=[(1.5, 1.0), (3.1, 1.2)])
    run, out = tmp_path / "prod", tmp_path / "report"
    assert train([f"run_dir={run}", "data=folder", f"data.root={data}", "train.max_steps=2",
                  *MICRO]) == 0
    assert compare([f"runs=[{run}]", f"out={out}", "max_prompts=1", "samples_per_prompt=1",
                    "prompt_seconds=2", "seconds=3", "device=cpu",
                    "likelihood=false", "copy_check=false"]) == 0
    prompt = json.loads((out / "report.json").read_text())["prompts"][0]
    name = prompt["name"]
    for system in ("prod", REFERENCE, PROMPT, ANCHOR):
        assert (out / "audio" / system / f"{name}.wav").stat().st_size > 1000, system
        assert _controls(out / "audio" / system / f"{name}.mid") == 0, system  # pedal folded
    assert _controls(prompt["source"]) > 0
    folded = read_notes(prompt["source"], 2.0, 3.0)  # the measured window, pedal folded in
    assert _seconds(out / "audio" / REFERENCE / f"{name}.mid") == _expected(folded)
    held = read_notes(prompt["source"], 2.0, 3.0, fold_pedal=False)
    assert (folded.end > held.end + 0.1).any()  # the pedal did hold notes in this window
    real, anchor = (_notes(out / "audio" / s / f"{name}.mid") for s in (REFERENCE, ANCHOR))
    # onsets and velocities kept; a held note is cut short only where its new pitch is
    # struck again while it sounds
    assert sorted((n[0], n[2]) for n in anchor) == sorted((n[0], n[2]) for n in real)
    assert sum(n[1] for n in anchor) <= sum(n[1] for n in real)
    assert sum(a[1] == r[1] for a, r in zip(anchor, real)) >= 0.8 * len(real)
    assert sorted(n[3] for n in anchor) == sorted(n[3] for n in real)
    assert [n[3] for n in anchor] != [n[3] for n in real]
    cut = read_notes(out / "prompts" / f"{name}.mid", 0.0, 2.0)  # as the branches got it
    assert _seconds(out / "audio" / PROMPT / f"{name}.mid") == _expected(cut)
    ids = {t.id for t in BlindTest.open(out).trials("ann")}
    assert ids == {f"{name}:pianist|prod", f"{name}:anchor|pianist"}
    # an output written before the test: prepare adds the clips, the same ones
    before = {s: (out / "audio" / s / f"{name}.mid").read_bytes()
              for s in (REFERENCE, PROMPT, ANCHOR)}
    for system in (PROMPT, ANCHOR):
        shutil.rmtree(out / "audio" / system)
    with pytest.raises(UserError, match="prepare"):
        BlindTest.open(out)
    listening.prepare(out)
    assert {s: (out / "audio" / s / f"{name}.mid").read_bytes() for s in before} == before
    assert (out / "audio" / PROMPT / f"{name}.wav").is_file()
    # ...and one whose pianist clip was cut with its pedal events (as before this version):
    # prepare cuts it again from the source, and its anchor with it
    import symusic

    old = symusic.Score(prompt["source"]).to("second").clip(2.0, 5.0, clip_end=False)
    old.shift_time(-2.0, inplace=False).to("tick").dump_midi(
        str(out / "audio" / REFERENCE / f"{name}.mid"))
    assert _controls(out / "audio" / REFERENCE / f"{name}.mid") > 0
    listening.prepare(out)
    assert {s: (out / "audio" / s / f"{name}.mid").read_bytes() for s in before} == before
    with pytest.raises(UserError, match="no report.json"):
        listening.prepare(tmp_path)
    with pytest.raises(UserError, match="no soundfont"):
        listening.prepare(out, font=tmp_path / "missing.sf2")
