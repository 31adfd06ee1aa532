"""The listening room (`mehldau-app`): driven through `gradio_client` against a launched page,
and through a real browser (Debian's chromium via Playwright) where chromium is installed.

One module fixture trains two micro runs (production, perceiver_mt), compares them with
audio, and launches the page on their folder; every test here uses that one page.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import MICRO, SCG_MICRO, album_names, scale_notes, write_midi

gr = pytest.importorskip("gradio", reason='the page needs gradio: pip install -e ".[app]"')

from mehldau import jobs  # noqa: E402
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
                    "samples_per_prompt=1", "prompt_seconds=2", "seconds=3", "bootstrap=10",
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
    before = _samples(world)
    job = client.submit("runs/prod", *{**PLAY, "sec": 60, "num": 4}.values(),
                        api_name="/generate")
    lock = world["app"].queue.lock(str(run.ckpt))
    deadline = time.monotonic() + 60
    while not lock.locked() and time.monotonic() < deadline:  # it is sampling
        time.sleep(0.05)
    assert client.predict(api_name="/stop") == "Stopped."
    assert lock.acquire(timeout=60)  # the sampling thread let go of the model
    lock.release()
    assert _samples(world) == before
    assert not job.done() or "1 sample" not in str(job.outputs())


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


@needs_audio
def test_a_listener_votes_blind_and_the_results_count_it(world) -> None:
    from mehldau.app.listen import CLIPS, ListenSession
    from mehldau.evaluation.listening import BlindTest
    from mehldau.evaluation.sample_view import wav_seconds

    # every clip as long as every other of its kind: length gives no system away
    lengths = {d.name: wav_seconds(d / "p00.wav") for d in (world["cmp"] / "audio").iterdir()}
    assert lengths.pop("prompt") == pytest.approx(2 + 1.0)
    assert set(lengths) == {"prod", "perc", "pianist", "anchor"}
    assert all(v == pytest.approx(3 + 1.0) for v in lengths.values())
    test = BlindTest.open(world["cmp"])
    s = ListenSession.start(test, "abc123", world["base"] / "serve", min_play=0.5)
    t = s.trial
    assert {t.a.system, t.b.system} <= {"prod", "perc", "pianist", "anchor"}
    names = {p.name for p in s.files.values()}
    assert all(n.endswith(".wav") and len(n) == 20 for n in names)  # random, not the system
    # the same clip served twice: other bytes (the page's cache names files by content),
    # the same audio
    import wave

    from mehldau.app.listen import neutral_copy

    one, two = (neutral_copy(t.a.wav, world["base"] / "twice") for _ in range(2))
    assert one.read_bytes() != two.read_bytes()
    frames = [wave.open(str(f)).readframes(10**7) for f in (one, two, t.a.wav)]
    assert frames[0] == frames[1] == frames[2]
    with pytest.raises(UserError, match="listen first"):
        s.vote("A", now=time.monotonic())
    for clip in CLIPS:
        s.play(clip, now=0.0)
        s.pause(clip, now=0.6)
    record = s.vote("B", 4, now=1.0)
    assert record["winner"] == t.b.system and record["listened"]["A"] == pytest.approx(0.6)
    lines = test.votes_path.read_text().splitlines()
    assert json.loads(lines[-1])["trial"] == t.id
    again = ListenSession.start(test, "abc123", world["base"] / "serve", min_play=0.5)
    assert again.done == 1 and again.trial.id != t.id  # resumed after the vote
    text = world["client"].predict("runs/cmp", api_name="/results")
    assert t.b.system in text and "Bradley" in text


# --- a real browser ------------------------------------------------------------------------
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at "
                    "/usr/bin/chromium (apt-get install chromium)")
@needs_audio
def test_in_a_real_browser_generate_hear_and_vote_blind_offline(world) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
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
        page.click("#begin")
        page.wait_for_selector("#trial >> text=Trial 1")
        for clip in ("prompt", "A", "B"):  # no way to download a blind clip
            assert "nodownload" in page.locator(f"#clip-{clip} audio").evaluate(
                "a => String(a.controlsList)")
            assert page.locator(f"#clip-{clip} [aria-label*=ownload]").count() == 0
        for clip in ("prompt", "A", "B"):  # the page's own players, as a listener's click
            page.locator(f"#clip-{clip} audio").evaluate("a => a.play()")
        page.wait_for_function(
            "() => !document.querySelector('#vote-A').disabled", timeout=30_000)
        if shots:
            page.screenshot(path=str(Path(shots) / "app_listen.png"), full_page=True)
        page.click("#vote-A")
        page.wait_for_selector("#listen-status >> text=Vote saved")
        phase["listen"] = False
        page.get_by_role("tab", name="Results").click()
        page.click("#results-go")
        page.wait_for_selector("#results >> text=Bradley")
        browser.close()
    assert outside == []
    votes = [json.loads(x) for x in (world["cmp"] / "listening" / "votes.jsonl").read_text()
             .splitlines()]
    assert votes[-1]["choice"] == "A" and votes[-1]["listener"] != "abc123"
    served = "\n".join(listen_bodies)
    assert "pianist" not in served and "anchor" not in served and "/audio/" not in served


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
