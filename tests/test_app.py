"""The listening room (`mehldau-app`): driven through `gradio_client` against a launched page,
and through a real browser (Debian's chromium via Playwright) where chromium is installed.

One module fixture trains two micro runs (production, perceiver_mt), compares them with
audio, and launches the page on their folder; every test here uses that one page.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import stat
import threading
import time
import wave
from pathlib import Path

import pytest
from conftest import MICRO, SCG_MICRO, album_names, scale_notes, write_midi

gr = pytest.importorskip("gradio", reason='the page needs gradio: pip install -e ".[app]"')

from mehldau import jobs  # noqa: E402
from mehldau.app.listen import CLIPS  # noqa: E402
from mehldau.cli.compare import main as compare  # noqa: E402
from mehldau.cli.generate import main as generate_cli  # noqa: E402
from mehldau.cli.train import main as train  # noqa: E402
from mehldau.errors import UserError  # noqa: E402

AUDIO = shutil.which("fluidsynth") is not None and any(
    Path(p).is_file() for p in ("/usr/share/sounds/sf2/FluidR3_GM.sf2",
                                "/usr/share/sounds/sf2/default-GM.sf2"))
CHROMIUM = "/usr/bin/chromium"
PERCEIVER = ["branch=perceiver_mt", "model.n_layers=1", "model.d_model=32", "model.n_heads=2",
             "model.d_ff=64", "model.max_seq_len=96", "model.num_latents=32",
             "model.max_relative_position=64", "train.batch_size=4", "train.warmup_steps=2",
             "train.log_every=2", "train.eval_every=4", "train.ckpt_every=4", "logger=none"]
# what the Play tab sends, in the order of its inputs (run, prompt, ..., DDIM steps)
PLAY = dict(pm="none", up=None, pc=None, rm="none", rup=None, rpc=None, sec=4, psec=2,
            temp=1.0, k=0, p=1.0, sd=0, num=1, sty=None, off=0, wp=1, wd=1, wc=1, cand=8, st=50)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("app")
    data = base / "data"
    for a, name in enumerate(album_names(data, 6)):
        for k in range(2):
            write_midi(data / name / f"piece {k}.mid",
                       scale_notes(48, base=50 + 2 * a + k, step=0.2, seed=10 * a + k))
    root = base / "runs"
    prod, perc = root / "prod", root / "perc"
    assert train([f"run_dir={prod}", "data=folder", f"data.root={data}", "train.max_steps=4",
                  *MICRO]) == 0
    assert train([f"run_dir={perc}", "data=folder", f"data.root={data}", "train.max_steps=4",
                  f"split.manifest={prod / 'splits.json'}", *PERCEIVER]) == 0
    cmp = root / "cmp"
    assert compare([f"runs=[{prod},{perc}]", f"out={cmp}", "max_prompts=1",
                    "samples_per_prompt=1", "prompt_seconds=2", "seconds=3",
                    "likelihood=false", "copy_check=false", "device=cpu",
                    f"audio={str(AUDIO).lower()}"]) == 0
    (root / "half_run").mkdir()
    (root / "half_run" / "metrics.jsonl").write_text('{"step": 1, "split": "val", "loss": 2}\n')
    alien = root / "alien"  # a run of a branch this installation does not have
    shutil.copytree(prod, alien)
    for meta in alien.glob("checkpoints/*/meta.json"):
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "branch": "zeta"}))
    outside = base / "outside"
    outside.mkdir()
    (root / "link_out").symlink_to(outside, target_is_directory=True)

    from gradio_client import Client

    from mehldau.app.ui import AppConfig, launch

    # started where a user starts it: in the folder holding runs/, which the page then
    # shows paths relative to
    here = os.getcwd()
    os.chdir(base)
    cfg = AppConfig(runs=["runs"], port=_free_port(), samples="samples",
                    min_play_seconds=0.5, max_upload_mb=0.05, device="cpu")
    page, app = launch(cfg, block=False)
    client = Client(f"http://127.0.0.1:{cfg.port}/", verbose=False)
    yield {"base": base, "root": root, "prod": prod, "perc": perc, "cmp": cmp, "app": app,
           "cfg": cfg, "client": client, "url": f"http://127.0.0.1:{cfg.port}/"}
    page.close()
    os.chdir(here)


def _play(client, run: str, **over):
    args = {**PLAY, **over}
    return client.predict(run, *args.values(), api_name="/generate")


def _samples(world) -> list[Path]:
    return sorted((world["base"] / "samples").rglob("sample*.mid"))


def _files(world) -> list[Path]:
    """Every file the Play tab has written (the Listen tab's served copies left out)."""
    samples = world["base"] / "samples"
    return sorted(f for f in samples.rglob("*") if f.is_file()
                  and not f.is_relative_to(samples / "listen"))


# --- runs and paths ------------------------------------------------------------------------
def test_runs_are_listed_with_what_they_are_and_unusable_ones_say_why(world) -> None:
    runs = {r.name: r for r in world["app"].roots.runs()}
    assert runs["runs/prod"].usable and runs["runs/prod"].branch == "production"
    assert runs["runs/perc"].branch == "perceiver_mt" and runs["runs/perc"].step == 4
    assert runs["runs/prod"].val_loss is not None and "val loss" in runs["runs/prod"].label
    assert not runs["runs/half_run"].usable and "no checkpoint" in runs["runs/half_run"].reason
    assert not runs["runs/alien"].usable and "unknown branch 'zeta'" in runs["runs/alien"].reason
    assert "unusable (unknown branch 'zeta')" in runs["runs/alien"].label
    assert "cannot generate" in _play(world["client"], "runs/alien")[0]
    assert "link_out" not in " ".join(runs)  # a symlink is not followed while listing
    assert world["app"].roots.compare_outputs() == ["runs/cmp"]


@pytest.mark.parametrize("name", ["../runs/prod", "/etc", "runs/../../x", "runs/link_out",
                                  "~/x", "other/prod", ""])
def test_a_name_outside_the_served_folders_is_refused(world, name) -> None:
    with pytest.raises(UserError, match="refused"):
        world["app"].roots.resolve(name)
    status = _play(world["client"], name)[0]
    assert "refused" in status and "Traceback" not in status


# --- Play ----------------------------------------------------------------------------------
def test_generate_returns_midi_png_and_wav_and_the_command_writes_the_same_bytes(
        world, tmp_path, monkeypatch) -> None:
    out = _play(world["client"], "runs/prod", pm="test piece",
                pc=sorted(world["app"].run("runs/prod").test_pieces())[0], sec=4, psec=2, sd=7)
    status, command, title, png, stats, wav, midi = out[:7]
    assert "1 sample(s)" in status and "sample.mid" in title
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "notes/s" in stats and "the piece, next 4 s" in stats
    if AUDIO:
        from mehldau.evaluation.sample_view import wav_seconds

        assert wav_seconds(wav) == pytest.approx(2 + 4, abs=0.01)  # prompt + what was asked
    else:
        assert wav is None and "fluidsynth" in status
    assert not any(isinstance(v, str) and v.endswith(".mid") for v in out[7:])  # one sample
    # the command the page shows regenerates the same bytes from the terminal
    args = shlex.split(command)
    assert args[0] == "mehldau-generate" and "seed=7" in args and "out=sample.mid" in args
    assert "ckpt=runs/prod/checkpoints/step_0000004" in args  # as typed where the page runs
    copy = tmp_path / "where the page runs"
    shutil.copytree(world["base"] / "runs" / "prod", copy / "runs" / "prod")
    shutil.copytree(world["base"] / "data", copy / "data")
    monkeypatch.chdir(copy)
    assert generate_cli(args[1:]) == 0
    assert (copy / "sample.mid").read_bytes() == Path(midi).read_bytes()


@pytest.mark.parametrize("content,reason", [(b"", "empty"), (b"hello, not midi", "not a MIDI"),
                                            (b"MThd" + b"\0" * 60_000, "limit"),
                                            (b"MThd\0\0\0\6\0\0\0\1\0\x60", "no notes")])
def test_a_bad_upload_is_one_message_writes_nothing_and_the_page_keeps_serving(
        world, tmp_path, content, reason) -> None:
    from gradio_client import handle_file

    bad = tmp_path / "prompt.mid"
    bad.write_bytes(content)
    before = _samples(world)
    try:
        status = _play(world["client"], "runs/prod", pm="upload", up=handle_file(str(bad)))[0]
    except Exception as e:  # the server's own size limit answers before our handler
        assert reason == "limit" and "size" in str(e).lower()
    else:
        assert reason in status and status.count("\n") == 0
    assert _samples(world) == before
    assert "1 sample(s)" in _play(world["client"], "runs/perc")[0]


def test_ten_concurrent_requests_complete_one_model_at_a_time_and_the_page_answers(
        world, monkeypatch) -> None:
    from mehldau.app import play

    running: dict[str, int] = {}
    most: dict[str, int] = {}
    lock = threading.Lock()
    real = play.generate

    def counted(run, args):
        with lock:
            running[run.name] = running.get(run.name, 0) + 1
            most[run.name] = max(most.get(run.name, 0), running[run.name])
        try:
            return real(run, args)
        finally:
            with lock:
                running[run.name] -= 1

    monkeypatch.setattr(play, "generate", counted)
    client = world["client"]
    jobs_ = [client.submit("runs/prod" if i % 2 else "runs/perc", *{**PLAY, "sd": i,
                                                                    "sec": 20}.values(),
                           api_name="/generate") for i in range(10)]
    answered = client.predict("runs/cmp", api_name="/results")  # meanwhile, another request
    pending = sum(not j.done() for j in jobs_)
    results = [j.result(timeout=300) for j in jobs_]
    assert all("1 sample(s)" in r[0] for r in results)
    assert len({r[0] for r in results}) == 10  # ten sample folders, one per request
    assert most == {"runs/prod": 1, "runs/perc": 1}
    assert isinstance(answered, str) and pending > 0  # answered before the queue drained


def test_stop_ends_a_generation_at_its_next_step(world) -> None:
    from mehldau.app import play

    app = world["app"]
    run = app.run("runs/prod")
    stop = threading.Event()
    seen: list[float] = []

    def progress(fraction, what):
        seen.append(fraction)
        if len(seen) == 5:
            stop.set()

    args = play.overrides(run, play.Settings(seconds=30), world["base"] / "stopped.mid")
    with pytest.raises(jobs.Stopped), jobs.controlled(stop, progress):
        play.generate(run, args)
    assert len(seen) == 5 and not (world["base"] / "stopped.mid").exists()
    seen.clear()
    with jobs.controlled(None, lambda f, w: seen.append(f)):  # unstopped: progress rises
        play.generate(run, args)
    assert seen == sorted(seen) and seen[-1] > 0.9


def test_the_stop_button_ends_a_long_generation_and_writes_nothing(world) -> None:
    from gradio_client import Client

    client = Client(world["url"], verbose=False)  # its own session: Stop is per session
    run = world["app"].run("runs/prod")
    before, files_before = _samples(world), _files(world)
    job = client.submit("runs/prod", *{**PLAY, "sec": 60, "num": 4}.values(),
                        api_name="/generate")
    lock = world["app"].queue.lock(str(run.ckpt))
    deadline = time.monotonic() + 60
    while not lock.locked() and time.monotonic() < deadline:  # it is sampling
        time.sleep(0.05)
    assert lock.locked(), "the generation never started sampling"
    assert client.predict(api_name="/stop") == "Stopped."
    assert lock.acquire(timeout=60)  # the sampling thread let go of the model
    lock.release()
    outcome = job.result(timeout=120)  # the request itself ends, and says it stopped
    assert job.done() and job.status().success
    assert outcome[0] == "Stopped." and outcome[1] == ""  # no command: there is no sample
    assert _samples(world) == before
    assert _files(world) == files_before  # nothing else either: no roll, no audio


def test_scg_diffusion_from_the_page_guided_by_a_reference_piece(world) -> None:
    """The scg controls: a reference excerpt's rule targets and weights; the page shows the
    guided sample beside its unguided twin, the rule losses, and the command."""
    root, data = world["root"], world["base"] / "data"
    common = ["data=folder", f"data.root={data}", *SCG_MICRO,
              f"split.manifest={world['prod'] / 'splits.json'}"]
    assert train([f"run_dir={root / 'scg_ae'}", "stage=autoencoder", *common]) == 0
    assert train([f"run_dir={root / 'scg'}", "stage=diffusion", f"init={root / 'scg_ae'}",
                  *common]) == 0
    app = world["app"]
    assert "autoencoder stage" in app.roots.runs()[
        [r.name for r in app.roots.runs()].index("runs/scg_ae")].reason
    pieces = sorted(app.run("runs/scg").test_pieces())
    from mehldau.app.play import Settings

    res = app.generate("runs/scg", "test piece", None, pieces[0], "test piece", None,
                       pieces[-1], Settings(seconds=2, prompt_seconds=1, candidates=2, steps=5,
                                            rule_weights=(2.0, 1.0, 0.5)), "scg")
    assert [s.midi.name for s in res["samples"]] == ["sample.mid", "sample.unguided.mid"]
    assert "| chord |" in res["rules"] and "unguided" in res["rules"]
    args = shlex.split(res["command"])
    assert "rules.weights.pitch_histogram=2" in args and "scg.candidates=2" in args
    assert not any(a.startswith(("temperature", "top_k", "top_p")) for a in args)


# --- Listen --------------------------------------------------------------------------------
needs_audio = pytest.mark.skipif(not AUDIO, reason="needs fluidsynth and a GM soundfont "
                                 "(apt-get install fluidsynth fluid-soundfont-gm)")


def _listen_in_turn(s, start: float) -> float:
    """Play each clip of the trial in turn, to its needed time, reporting as the page does;
    the server-clock time afterwards."""
    now = start
    for clip in CLIPS:
        s.play(clip, 0.0, now=now)
        s.tick({clip: 0.4}, now=now + 0.4)
        s.pause(clip, s.needed[clip], now=now + s.needed[clip])
        now += s.needed[clip] + 0.1
    return now


@needs_audio
def test_a_listener_hears_one_clip_at_a_time_votes_blind_and_sees_results_when_done(
        world) -> None:
    from mehldau.app.listen import ListenSession, neutral_copy
    from mehldau.evaluation.listening import BlindTest
    from mehldau.evaluation.sample_view import wav_seconds

    app = world["app"]
    # every clip as long as every other of its kind: length gives no system away
    lengths = {d.name: wav_seconds(d / "p00.wav") for d in (world["cmp"] / "audio").iterdir()}
    assert lengths.pop("prompt") == pytest.approx(2 + 1.0)
    assert set(lengths) == {"prod", "perc", "pianist", "anchor"}
    assert all(v == pytest.approx(3 + 1.0) for v in lengths.values())
    test = BlindTest.open(world["cmp"])
    code = test.issue_codes(1)[0]
    s = ListenSession.start(test, code, world["base"] / "serve", min_play=0.5)
    t = s.trial
    assert {t.a.system, t.b.system} <= {"prod", "perc", "pianist", "anchor"}
    assert all(p.suffix == ".wav" and len(p.stem) == 16 for p in s.files.values())  # random
    # the same clip served twice: other bytes (the page's cache names files by content),
    # the same audio
    one, two = (neutral_copy(t.a.wav, world["base"] / "twice") for _ in range(2))
    assert one.read_bytes() != two.read_bytes()
    frames = [wave.open(str(f)).readframes(10**7) for f in (one, two, t.a.wav)]
    assert frames[0] == frames[1] == frames[2]

    # all three played at once for 2 s: only the last one started is counted
    for clip in CLIPS:
        s.play(clip, 0.0, now=0.0)
    s.tick({"prompt": 2.0, "A": 2.0, "B": 2.0}, now=2.0)
    for clip in CLIPS:
        s.pause(clip, 2.0, now=2.0)
    assert s.listened() == {"prompt": 0.0, "A": 0.0, "B": 2.0}
    with pytest.raises(UserError, match="listen first: play prompt, A for at least"):
        s.vote("A")
    # a seek forward is worth the time it took; a seek back, nothing
    s.play("A", 0.0, now=10.0)
    s.tick({"A": 3.0}, now=10.2)  # jumped to the end in 0.2 s
    s.tick({"A": 1.0}, now=10.6)  # back
    assert s.listened()["A"] == pytest.approx(0.2)
    s.tick({"A": 1.3}, now=10.9)
    assert s.listened()["A"] == pytest.approx(0.5)
    # a pause that never arrives: nothing past the last position reported
    s.play("prompt", 0.0, now=20.0)
    s.tick({"prompt": 0.3}, now=20.3)
    assert s.listened()["prompt"] == pytest.approx(0.3) and not s.unlocked()
    s.tick({"prompt": 0.55}, now=20.55)
    assert s.unlocked()
    record = s.vote("B", 4)
    assert record["winner"] == t.b.system and record["listener"] != code
    assert record["listened"] == {"prompt": 0.55, "A": 0.5, "B": 2.0}
    assert json.loads(test.votes_path.read_text().splitlines()[-1])["trial"] == t.id

    # results: refused mid-test, here and through the page's API
    with pytest.raises(UserError, match="once you have voted on every trial"):
        app.results("runs/cmp", s)
    assert "once you have voted on every trial" in world["client"].predict(
        "runs/cmp", api_name="/results")
    again = ListenSession.start(test, code, world["base"] / "serve", min_play=0.5)
    assert again.done == 1 and again.trial.id != t.id  # resumed after the vote
    now = 100.0
    while again.trial is not None:
        now = _listen_in_turn(again, now)
        again.vote("none")
    assert again.finished and "Bradley" in app.results("runs/cmp", again)
    with pytest.raises(UserError, match="once you have voted"):  # s is not told: its own
        app.results("runs/cmp", s)                               # trial list is stale
    app.cfg.show_results = True  # the operator's switch
    try:
        assert "Bradley" in app.results("runs/cmp", None)
    finally:
        app.cfg.show_results = False


BLIND = ("pianist", "anchor", "prod", "perc", "/audio/", "|")  # what names a clip's system


@needs_audio
def test_a_scripted_listener_gets_nothing_it_should_not(world, monkeypatch) -> None:
    """Through the page's API, as a script would: made-up codes, a vote before Start, clips
    played together with made-up positions and pauses, Results mid-test; and what a listener
    can read (report.json) holds nothing that draws the sides."""
    from gradio_client import Client

    from mehldau.evaluation.listening import listener_of

    client = Client(world["url"], verbose=False)
    said: list[str] = []

    def call(api: str, *args):
        out = client.predict(*args, api_name=api)
        said.append(json.dumps(out))
        return out

    where = lambda pos: json.dumps(dict.fromkeys(CLIPS, pos))  # noqa: E731
    # a longer minimum than the module's, so that three clips counted at once would open the
    # vote well before three counted in turn; every clip here is longer than 1.5 + 0.25 s
    min_play = 1.5
    monkeypatch.setattr(world["cfg"], "min_play_seconds", min_play)
    assert "press Start first" in call("/listen_vote_A", None)[0]
    for made_up in ("0000-0000-0000-0000", "abc123", "../../report.json"):
        out = call("/listen_start", "runs/cmp", made_up, {})
        assert "is not a listener code of this test" in out[2] and out[3] == ""
        assert "press Start first" in call("/listen_vote_B", None)[0]
    out = call("/listen_start", "runs/cmp", "", {})
    code, stored, status, head = out[:4]
    assert stored == {"runs/cmp": code} and status == "" and "Trial 1 of" in head
    listener = listener_of(code)
    # a browser that holds an unfinished code resumes it rather than minting another
    assert call("/listen_start", "runs/cmp", "", stored)[0] == code
    assert "once you have voted on every trial" in call("/results", "runs/cmp")

    start = time.monotonic()
    for clip in CLIPS:  # all three at once, a minute in, then paused at their ends
        call(f"/listen_play_{clip}", where(0.0))
    call("/listen_tick", where(60.0))
    for clip in CLIPS:
        call(f"/listen_end_{clip}", where(60.0))
    assert "listen first" in call("/listen_vote_A", None)[0]
    # then all three at once again and again, another one started last each time, with
    # positions claiming twice the time that passed, until the vote opens
    order, answer = list(CLIPS), ""
    while "Vote saved" not in answer:
        for clip in order:
            call(f"/listen_play_{clip}", where(0.0))
        played = time.monotonic()
        while time.monotonic() - played < min_play + 0.1:
            call("/listen_tick", where(2 * (time.monotonic() - played)))
        for clip in order:
            call(f"/listen_pause_{clip}", where(2 * (time.monotonic() - played)))
        answer = call("/listen_vote_A", None)[0]
        assert "Vote saved" in answer or "listen first" in answer
        assert time.monotonic() - start < 60
        order = order[1:] + order[:1]
    took = time.monotonic() - start
    assert took >= 3 * min_play  # no sooner than a listener who plays each clip in turn
    vote = json.loads((world["cmp"] / "listening" / "votes.jsonl").read_text().splitlines()[-1])
    assert vote["listener"] == listener and sum(vote["listened"].values()) <= took
    assert "once you have voted on every trial" in call("/results", "runs/cmp")
    # nothing said during the trial names a system or where a clip comes from, and the
    # secret that draws the sides is neither said nor in report.json
    salt = (world["cmp"] / "listening" / "salt")
    assert stat.S_IMODE(salt.stat().st_mode) == 0o600
    secret = salt.read_text().strip()
    for text in said:
        assert not any(word in text for word in BLIND), text
        assert secret not in text
    assert secret not in (world["cmp"] / "report.json").read_text()


# --- a real browser ------------------------------------------------------------------------
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at "
                    "/usr/bin/chromium (apt-get install chromium)")
@needs_audio
def test_in_a_real_browser_generate_hear_and_vote_blind_offline(world) -> None:
    """Play as a user does; then the blind test as a listener who first tries a made-up code
    and plays the three clips at once: the page pauses all but one, the vote waits until
    each was heard in turn, Results stay shut mid-test, and a reload resumes the same code."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from mehldau.evaluation.listening import listener_of

    shots = os.environ.get("MEHLDAU_SCREENSHOTS")  # a folder: save the page as the README's
    outside: list[str] = []
    listen_bodies: list[str] = []
    phase = {"listen": False}

    def on_request(req) -> None:
        if not req.url.startswith(("http://127.0.0.1", "http://localhost", "data:", "blob:")):
            outside.append(req.url)

    def on_response(resp) -> None:
        if phase["listen"] and "text" in (resp.headers.get("content-type") or "") + "json":
            try:
                listen_bodies.append(resp.text())
            except Exception:  # a streamed body may be gone; the others still count
                pass

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("request", on_request)
        page.on("response", on_response)
        page.goto(world["url"])
        page.wait_for_selector("#generate")
        page.click("#generate")
        page.wait_for_selector("#roll-0 img", timeout=120_000)
        seconds = page.evaluate("""async () => {
            const a = document.querySelector('#audio-0 audio');
            const r = await fetch(a.src || a.currentSrc);
            const ctx = new OfflineAudioContext(1, 1, 44100);
            return (await ctx.decodeAudioData(await r.arrayBuffer())).duration; }""")
        assert seconds == pytest.approx(10, abs=0.05)  # the page's default: 10 s, no prompt
        if shots:
            page.screenshot(path=str(Path(shots) / "app_play.png"), full_page=True)

        page.get_by_role("tab", name="Listen").click()
        phase["listen"] = True
        page.fill("#listener textarea", "0000-0000-0000-0000")  # a code never issued
        page.click("#begin")
        page.wait_for_selector("#listen-status >> text=is not a listener code of this test")
        page.fill("#listener textarea", "")
        page.click("#begin")  # no code: the server issues one
        page.wait_for_selector("#trial >> text=Trial 1")
        code = page.locator("#listener textarea").input_value()
        assert re.fullmatch(r"[0-9a-f]{4}(-[0-9a-f]{4}){3}", code)
        for clip in CLIPS:  # no way to download a blind clip
            assert "nodownload" in page.locator(f"#clip-{clip} audio").evaluate(
                "a => String(a.controlsList)")
            assert page.locator(f"#clip-{clip} [aria-label*=ownload]").count() == 0
        started = time.monotonic()
        for clip in CLIPS:  # all three at once, through the page's own players
            page.locator(f"#clip-{clip} audio").evaluate("a => a.play()")
        page.wait_for_timeout(1200)
        playing = page.evaluate("() => [...document.querySelectorAll('[id^=clip-] audio')]"
                                ".filter(a => !a.paused).length")
        assert playing <= 1 and page.locator("#vote-A").is_disabled()
        for clip in CLIPS:  # then each in turn, until the page no longer asks for it
            page.locator(f"#clip-{clip} audio").evaluate("a => a.play()")
            page.wait_for_function(
                "c => !document.querySelector('#listen-status').innerText.includes(c + ' (')",
                arg=clip, timeout=30_000)
        page.wait_for_function(
            "() => !document.querySelector('#vote-A').disabled", timeout=30_000)
        assert time.monotonic() - started >= 3 * world["cfg"].min_play_seconds
        if shots:
            page.screenshot(path=str(Path(shots) / "app_listen.png"), full_page=True)
        page.click("#vote-A")
        page.wait_for_selector("#listen-status >> text=Vote saved")
        blind_text = page.evaluate("() => ['#trial', '#listen-status', '#listener']"
                                   ".map(q => document.querySelector(q).innerText).join(' ')"
                                   " + [...document.querySelectorAll('audio')]"
                                   ".map(a => a.currentSrc).join(' ')")
        page.get_by_role("tab", name="Results").click()
        page.click("#results-go")  # mid-test: refused
        page.wait_for_selector("#results >> text=once you have voted on every trial")
        phase["listen"] = False  # the page itself (run names, labels) loads again
        page.reload()  # the browser keeps its code: Start resumes the test where it was
        page.get_by_role("tab", name="Listen").click()
        page.click("#begin")
        page.wait_for_selector("#trial >> text=Trial 2")
        assert page.locator("#listener textarea").input_value() == code
        browser.close()
    assert outside == []
    votes = [json.loads(x) for x in (world["cmp"] / "listening" / "votes.jsonl").read_text()
             .splitlines()]
    assert votes[-1]["choice"] == "A" and votes[-1]["listener"] == listener_of(code)
    assert sum(votes[-1]["listened"].values()) <= time.monotonic() - started
    served = "\n".join([*listen_bodies, blind_text])
    assert not [w for w in BLIND if w in served], [
        line for line in served.splitlines() if any(w in line for w in BLIND)]


@pytest.mark.parametrize("args,message", [
    (["app.runs=[/no/such/folder]"], "is not a folder"),
    (["app.port=70000"], "app.port must be 1 to 65535"),
    (["app.max_upload_mb=0"], "max_upload_mb must be positive"),
    (["app.nope=1"], "unknown option"),
])
def test_mehldau_app_bad_settings_are_one_line(args, message, tmp_path, capsys) -> None:
    from mehldau.cli.app import main as app_main

    assert app_main([f"app.runs=[{tmp_path}]", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mehldau-app: error:") and message in err and "\n" not in err
