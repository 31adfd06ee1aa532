"""The page: Play (sample any run and hear it), Listen (a blind A/B test over a
`mehldau-compare` output) and Results (what the votes say), in Gradio Blocks.

Gradio is the kept library for a model demo page (SkyTNT's midi-model app uses it too); all
the page's decisions live in `runs`, `play` and `listen`, so this file only lays out
components and wires events. Offline by construction: analytics off, system fonts, no share
link, bound to loopback unless told otherwise.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from mehldau import jobs  # noqa: E402
from mehldau.app import play as P  # noqa: E402
from mehldau.app.listen import ListenSession, open_session  # noqa: E402
from mehldau.app.runs import Roots, RunInfo  # noqa: E402
from mehldau.errors import UserError  # noqa: E402
from mehldau.evaluation import sample_view as view  # noqa: E402
from mehldau.evaluation.listening import (  # noqa: E402
    BlindTest,
    format_summary,
    read_votes,
    summarize,
)

MAX_SAMPLES = 4  # sample slots on the page
# The browser's own <audio> player rather than a drawn waveform: a blind listener hears and
# does not read the density off a picture, and it is a plain element anything can drive.
PLAYER = dict(type="filepath", interactive=False,
              waveform_options=gr.WaveformOptions(show_recording_waveform=False))


@dataclass
class AppConfig:
    runs: list[str] = field(default_factory=lambda: ["runs"])
    host: str = "127.0.0.1"
    port: int = 7860
    device: str = "auto"
    samples: str | None = None  # where generated samples go; None = a temp folder
    max_upload_mb: float = 5.0
    min_play_seconds: float = 5.0
    listen: str | None = None  # a compare output (a name under the roots) to open first
    soundfont: str | None = None
    reference_pieces: int = 8  # test pieces averaged for the no-prompt reference statistics
    show_results: bool = False  # Results for everyone; else only to who finished the test


# The blind test's players offer no download: the browser's own menu item is switched off
# (and the clip names are random anyway). One plays at a time, as the server counts them: a
# player that starts pauses the others (media events do not bubble; capture sees them).
HEAD = """<script>
new MutationObserver(() => document.querySelectorAll('[id^="clip-"] audio').forEach(a => {
  a.controlsList = 'nodownload noplaybackrate'; a.oncontextmenu = () => false; }))
  .observe(document.documentElement, {childList: true, subtree: true});
document.addEventListener('play', e => {
  if (!(e.target instanceof HTMLMediaElement) || !e.target.closest('[id^="clip-"]')) return;
  document.querySelectorAll('[id^="clip-"] audio').forEach(a => {
    if (a !== e.target && !a.paused) a.pause(); });
}, true);
</script>"""
# Run in the browser before each timing event: every blind player's position, as JSON, in
# place of the hidden `positions` input (the session state passes through untouched).
POSITIONS_JS = """(session, _) => [session, JSON.stringify(Object.fromEntries(
  ['prompt', 'A', 'B'].map(c =>
    [c, document.querySelector(`#clip-${c} audio`)?.currentTime ?? null])))]"""


def theme() -> gr.themes.Base:
    # System fonts: Gradio themes can name web fonts (GoogleFont), and the page must need
    # no network; the browser test fails on any request that leaves loopback.
    return gr.themes.Default(font=[gr.themes.Font("system-ui"), "sans-serif"],
                             font_mono=[gr.themes.Font("ui-monospace"), "monospace"])


class App:
    """State shared by every browser session: the roots, the per-model queue, stop events."""

    def __init__(self, cfg: AppConfig) -> None:
        self.cfg = cfg
        self.roots = Roots(list(cfg.runs))
        self.samples = Path(cfg.samples).expanduser().resolve() if cfg.samples else Path(
            tempfile.mkdtemp(prefix="mehldau-app-"))
        self.samples.mkdir(parents=True, exist_ok=True)
        self.serve = self.samples / "listen"
        self.queue = P.ModelQueue()
        self.stops: dict[str, threading.Event] = {}
        from mehldau.generation import device_for

        self.device = str(device_for(cfg.device).type)

    # --- Play ---------------------------------------------------------------------------
    def run_choices(self) -> list[tuple[str, str]]:
        return [(r.label, r.name) for r in self.roots.runs()]

    def run(self, name: str) -> RunInfo:
        from mehldau.app.runs import describe

        path = self.roots.resolve(name)
        info = describe(path, self.roots.name_of(path))
        if not info.usable:
            raise UserError(f"{info.name} cannot generate: {info.reason}")
        return info

    def generate(self, name: str, prompt_mode: str, upload: str | None, piece: str | None,
                 ref_mode: str, ref_upload: str | None, ref_piece: str | None,
                 s: P.Settings, session: str, progress=None) -> dict:
        """Everything one click of Generate shows, or a one-line message in `error`."""
        run = self.run(name)
        max_bytes = int(self.cfg.max_upload_mb * 1e6)
        prompt = self._source(run, prompt_mode, upload, piece, max_bytes, "prompt")
        reference = None
        if run.branch == "scg_diffusion":
            reference = self._source(run, ref_mode, ref_upload, ref_piece, max_bytes,
                                     "rule reference")
        if int(s.num_samples) > MAX_SAMPLES or int(s.num_samples) < 1:
            raise UserError(f"number of samples must be 1 to {MAX_SAMPLES}")
        out_dir = P.fresh_dir(self.samples / run.name.replace("/", "__"), "sample-")
        # An upload is kept beside the samples (the command names it); a test piece is read
        # where the run's manifest says.
        if prompt is not None and prompt_mode == "upload":
            prompt = P.copy_prompt(prompt, out_dir, "prompt.mid")
        if reference is not None and ref_mode == "upload":
            reference = P.copy_prompt(reference, out_dir, "reference.mid")
        args = P.overrides(run, s, out_dir / "sample.mid", prompt, reference, self.device)
        stop = self.stops.setdefault(session, threading.Event())
        stop.clear()
        report = (lambda f, what: progress(f, desc=what)) if progress is not None else None
        with self.queue.lock(str(run.ckpt)):
            with jobs.controlled(stop, report):
                files = P.generate(run, args)
        start = float(s.prompt_seconds) if prompt is not None else 0.0
        samples = [P.present(f, start, float(s.seconds), self.cfg.soundfont) for f in files]
        ref_files = [prompt] if prompt is not None else list(
            run.test_pieces().values())[: self.cfg.reference_pieces]
        ref_stats = P.reference_stats(ref_files, start, float(s.seconds))
        ref_name = (f"the piece, next {float(s.seconds):g} s" if prompt is not None else
                    f"{len(ref_files)} test pieces")
        # as typed in the folder the page was started from: paths under it are relative
        shown = ["out=sample.mid" if a.startswith("out=") else _relative_arg(a) for a in args]
        return {"samples": samples, "ref": ref_stats, "ref_name": ref_name,
                "command": P.command_line(shown), "dir": out_dir,
                "rules": _rule_losses(files[0].with_suffix(".json")) if files else ""}

    def _source(self, run: RunInfo, mode: str, upload: str | None, piece: str | None,
                max_bytes: int, what: str) -> Path | None:
        if mode == "upload":
            path = P.check_upload(upload, max_bytes)
            if path is None:
                raise UserError(f"no file uploaded for the {what}; upload a .mid or choose "
                                "another option")
            return path
        if mode == "test piece":
            pieces = run.test_pieces()
            if piece not in pieces:
                raise UserError(f"pick a piece of {run.name}'s test split for the {what}")
            return pieces[piece]
        return None

    def stop(self, session: str) -> None:
        if session in self.stops:
            self.stops[session].set()

    # --- Listen -------------------------------------------------------------------------
    def open_test(self, name: str) -> BlindTest:
        return BlindTest.open(self.roots.resolve(name))

    def results(self, name: str, session: ListenSession | None) -> str:
        """The test's figures, for the operator's page (`show_results`) or a session that has
        voted on every trial of this test; else a one-line UserError. Checked here, not in the
        page: a script can call this event whatever the page shows."""
        test = self.open_test(name)
        if not self.cfg.show_results and not (session is not None and session.finished
                                              and session.test.dir == test.dir):
            raise UserError("results are shown once you have voted on every trial of this "
                            "test (or to everyone when the operator sets app.show_results=true)")
        votes, bad = read_votes(test.votes_path)
        if not votes:
            return "No votes yet on this test."
        text = format_summary(summarize(votes, bootstrap=500))
        if bad:
            text += "\n\nSkipped lines: " + "; ".join(bad[:5])
        return text


def _rule_losses(path: Path) -> str:
    """scg_diffusion's guided sample beside its unguided twin (same seed): each rule's loss
    against the reference excerpt, from the JSON the branch writes."""
    import json

    try:
        d = json.loads(path.read_text())
        rows = [f"| {r} | {d['guided'][r]:.4g} | {d['unguided'][r]:.4g} |" for r in d["guided"]]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return "\n".join(["Rule losses against the reference excerpt (lower is closer; "
                      "`.unguided` is the same seed without guidance):", "",
                      "| rule | guided | unguided |", "|---|---|---|", *rows])


def _shown(path: Path) -> str:
    """A path as the user would type it from the folder the page runs in."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def _relative_arg(arg: str) -> str:
    key, _, value = arg.partition("=")
    return f"{key}={_shown(Path(value))}" if key in ("ckpt", "prompt", "rules.reference") \
        else arg


def _positions(text) -> dict:
    """The JSON the page's POSITIONS_JS sends ({clip: seconds or null}); {} where it is not
    that (a script may send anything)."""
    import json

    try:
        d = json.loads(text) if isinstance(text, str) and len(text) < 1000 else None
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "cli"


def build(cfg: AppConfig) -> tuple[gr.Blocks, App]:
    app = App(cfg)
    runs = app.run_choices()
    first = next((v for label, v in runs if "unusable" not in label), None)
    audio_line = "" if view.audio_available(cfg.soundfont) else f"**{view.INSTALL_AUDIO}**"

    with gr.Blocks(title="mehldau listening room") as page:
        gr.Markdown("# mehldau listening room\nSample any trained run and hear it; judge the "
                    "branches blind. Everything runs on this machine.")
        with gr.Tab("Play", id="play"):
            with gr.Row():
                run_dd = gr.Dropdown(runs, value=first, label="run", scale=4, elem_id="run",
                                     allow_custom_value=True)  # Roots.resolve checks it
                refresh = gr.Button("Rescan runs and comparisons", scale=1)
            run_md = gr.Markdown(elem_id="run-info")
            with gr.Row():
                prompt_mode = gr.Radio(["none", "test piece", "upload"], value="none",
                                       label="prompt", elem_id="prompt-mode")
                piece = gr.Dropdown([], label="test piece", elem_id="piece",
                                    allow_custom_value=True)
                upload = gr.File(label="prompt .mid", file_types=[".mid", ".midi"],
                                 type="filepath", elem_id="upload")
            with gr.Row():
                seconds = gr.Slider(2, 60, value=10, step=1, label="seconds to generate",
                                    elem_id="seconds")
                prompt_seconds = gr.Slider(1, 30, value=5, step=1, label="prompt seconds")
                seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                n = gr.Slider(1, MAX_SAMPLES, value=1, step=1, label="samples")
            with gr.Row(visible=True) as token_row:
                temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="temperature")
                top_k = gr.Slider(0, 200, value=0, step=1, label="top-k (0 = off)")
                top_p = gr.Slider(0.5, 1.0, value=1.0, step=0.01, label="top-p (1 = off)")
                style = gr.Dropdown([], label="style", visible=False)
            with gr.Group(visible=False) as scg_box:
                gr.Markdown("Stochastic Control Guidance: steer toward the rule features of "
                            "a reference excerpt (none = unguided)")
                with gr.Row():
                    ref_mode = gr.Radio(["none", "test piece", "upload"], value="none",
                                        label="rule reference")
                    ref_piece = gr.Dropdown([], label="reference piece",
                                            allow_custom_value=True)
                    ref_upload = gr.File(label="reference .mid", file_types=[".mid", ".midi"],
                                         type="filepath")
                    offset = gr.Number(0, label="excerpt starts at (s)")
                with gr.Row():
                    w_pitch = gr.Slider(0, 5, value=1, step=0.1, label="pitch histogram weight")
                    w_density = gr.Slider(0, 5, value=1, step=0.1, label="note density weight")
                    w_chord = gr.Slider(0, 5, value=1, step=0.1, label="chord weight")
                    candidates = gr.Slider(1, 16, value=8, step=1, label="candidates")
                    steps = gr.Slider(5, 200, value=P.Settings.steps, step=5, label="DDIM steps")
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                stop = gr.Button("Stop", variant="stop", elem_id="stop")
            status = gr.Markdown(audio_line, elem_id="play-status")
            command = gr.Textbox(label="reproduce from a terminal (in the folder mehldau-app was "
                                 "started from)", interactive=False,
                                 elem_id="command", buttons=["copy"])
            slots = []
            for i in range(MAX_SAMPLES):
                with gr.Group(visible=False) as box:
                    title = gr.Markdown(f"### sample {i + 1}")
                    with gr.Row():
                        image = gr.Image(label="piano roll", type="filepath", interactive=False,
                                         buttons=["download", "fullscreen"],
                                         elem_id=f"roll-{i}")
                        stats = gr.Markdown(elem_id=f"stats-{i}")
                    audio = gr.Audio(label="audio", buttons=["download"], elem_id=f"audio-{i}",
                                     **PLAYER)
                    midi = gr.File(label="MIDI", interactive=False, elem_id=f"midi-{i}")
                slots.append((box, title, image, stats, audio, midi))

        with gr.Tab("Listen", id="listen"):
            tests = app.roots.compare_outputs()
            if cfg.listen and Path(cfg.listen).expanduser().is_dir():  # a path, not a name
                cfg.listen = app.roots.name_of(Path(cfg.listen).expanduser())
            gr.Markdown("A blind test: hear the prompt, then two continuations of it, A and "
                        "B, and say which you prefer. Names and order are hidden and "
                        "shuffled for each listener. The vote opens once each clip has been "
                        f"heard for {cfg.min_play_seconds:g} s, one clip at a time. Press "
                        "Start with the box empty for a listener code, or type the one you "
                        "were given.")
            with gr.Row():
                test_dd = gr.Dropdown(tests, value=cfg.listen or (tests[0] if tests else None),
                                      label="comparison (a mehldau-compare output)",
                                      elem_id="test", allow_custom_value=True)
                code = gr.Textbox(label="listener code (keep it to resume elsewhere)",
                                  elem_id="listener", max_length=64)
                begin = gr.Button("Start / resume", elem_id="begin")
            trial_md = gr.Markdown(elem_id="trial")
            p_audio = gr.Audio(label="prompt", buttons=[], elem_id="clip-prompt", **PLAYER)
            with gr.Row():
                a_audio = gr.Audio(label="A", buttons=[], elem_id="clip-A", **PLAYER)
                b_audio = gr.Audio(label="B", buttons=[], elem_id="clip-B", **PLAYER)
            rating = gr.Radio(["1", "2", "3", "4", "5"], label="the one you prefer sounds like "
                              "the pianist (1 = not at all, 5 = could be them), optional",
                              elem_id="rating")
            with gr.Row():
                vote_a = gr.Button("A", interactive=False, elem_id="vote-A")
                vote_none = gr.Button("no preference", interactive=False, elem_id="vote-none")
                vote_b = gr.Button("B", interactive=False, elem_id="vote-B")
            listen_status = gr.Markdown(elem_id="listen-status")
            session = gr.State(None)
            # the codes this browser was given, per test: {test name: code}
            stored_id = gr.BrowserState({}, storage_key="mehldau-listener-codes")
            positions = gr.Textbox(visible=False, elem_id="positions")
            tick = gr.Timer(1.0)

        with gr.Tab("Results", id="results"):
            res_dd = gr.Dropdown(tests, value=tests[0] if tests else None,
                                 label="comparison", elem_id="results-test",
                                 allow_custom_value=True)
            res_go = gr.Button("Show results", elem_id="results-go")
            res_md = gr.Markdown(elem_id="results")

        # --- Play events ------------------------------------------------------------------
        def on_run(name):
            try:
                info = app.run(name)
            except UserError as e:
                return (f"**{e}**", gr.update(choices=[]), gr.update(visible=True),
                        gr.update(visible=False), gr.update(choices=[], visible=False),
                        gr.update(choices=[]))
            pieces = list(info.test_pieces())
            scg = info.branch == "scg_diffusion"
            return (f"{info.label}  \ncheckpoint `{_shown(info.ckpt)}`",
                    gr.update(choices=pieces, value=pieces[0] if pieces else None),
                    gr.update(visible=not scg), gr.update(visible=scg),
                    gr.update(choices=info.styles, value=info.styles[0] if info.styles
                              else None, visible=bool(info.styles)),
                    gr.update(choices=pieces, value=pieces[0] if pieces else None))

        run_outputs = [run_md, piece, token_row, scg_box, style, ref_piece]
        run_dd.change(on_run, run_dd, run_outputs)
        page.load(on_run, run_dd, run_outputs)
        def rescan():  # runs trained and comparisons written since the page started
            tests = app.roots.compare_outputs()
            return (gr.update(choices=app.run_choices()), gr.update(choices=tests),
                    gr.update(choices=tests))

        refresh.click(rescan, None, [run_dd, test_dd, res_dd])

        play_inputs = [run_dd, prompt_mode, upload, piece, ref_mode, ref_upload, ref_piece,
                       seconds, prompt_seconds, temperature, top_k, top_p, seed, n, style,
                       offset, w_pitch, w_density, w_chord, candidates, steps]
        slot_outputs = [c for slot in slots for c in slot]

        def on_generate(name, pm, up, pc, rm, rup, rpc, sec, psec, temp, k, p, sd, num, sty,
                        off, wp, wd, wc, cand, st, request: gr.Request,
                        progress=gr.Progress()):  # noqa: B008 (how Gradio asks for it)
            settings = P.Settings(seconds=float(sec), prompt_seconds=float(psec),
                                  temperature=float(temp), top_k=int(k), top_p=float(p),
                                  seed=int(sd or 0), num_samples=int(num), style=sty,
                                  rule_offset=float(off or 0), rule_weights=(wp, wd, wc),
                                  candidates=int(cand), steps=int(st))
            empty = [gr.update(visible=False)] + [gr.update()] * 5
            try:
                res = app.generate(name, pm, up, pc, rm, rup, rpc, settings,
                                   _session(request), progress)
            except jobs.Stopped:
                return ["Stopped.", ""] + empty * MAX_SAMPLES
            except UserError as e:
                return [f"**{e}**", ""] + empty * MAX_SAMPLES
            out = [f"{len(res['samples'])} sample(s) written to `{_shown(res['dir'])}`. "
                   + (audio_line or "") + ("\n\n" + res["rules"] if res["rules"] else ""),
                   res["command"]]
            for i in range(MAX_SAMPLES):
                if i >= len(res["samples"]):
                    out += empty
                    continue
                smp = res["samples"][i]
                out += [gr.update(visible=True), f"### sample {i + 1}: `{smp.midi.name}`",
                        str(smp.png),
                        view.stats_table(smp.stats, res["ref"] or None, res["ref_name"]),
                        str(smp.wav) if smp.wav else None, str(smp.midi)]
            return out

        gen_event = go.click(on_generate, play_inputs, [status, command, *slot_outputs],
                             concurrency_limit=8, concurrency_id="generate",
                             api_name="generate")
        def on_stop(request: gr.Request):
            app.stop(_session(request))  # the sampling loop raises at its next step
            return "Stopped."

        stop.click(on_stop, None, status, cancels=[gen_event], api_name="stop")

        # --- Listen events ----------------------------------------------------------------
        # Nothing these send while a trial runs names a system or a clip's source: the trial
        # line counts trials, the players get random copies, the statuses speak of A and B.
        def trial_view(s: ListenSession | None, note: str = ""):
            if s is None or s.trial is None:
                done = (f"All {s.total} trials done: thank you. Listener code `{s.code}`; "
                        "the Results tab now shows this test's figures."
                        if s is not None else "")
                return [note or done, None, None, None, None,
                        *[gr.update(interactive=False)] * 3]
            head = (f"**Trial {s.done + 1} of {s.total}.** Play the prompt, then A and B, one "
                    "at a time.")
            return [note or head, str(s.files["prompt"]), str(s.files["A"]),
                    str(s.files["B"]), None, *[gr.update(interactive=s.unlocked())] * 3]

        listen_outputs = [trial_md, p_audio, a_audio, b_audio, rating, vote_a, vote_none,
                          vote_b]

        def on_begin(name, typed, stored, s):
            held = dict(stored) if isinstance(stored, dict) else {}
            try:
                test = app.open_test(name)
                mine = str(held.get(name) or "")
                if not mine and s is not None and s.test.dir == test.dir:  # this page's own
                    mine = s.code
                new = open_session(test, typed, mine, app.serve, cfg.min_play_seconds)
            except UserError as e:
                return [s, typed, stored, f"**{e}**", *trial_view(None)]
            if s is not None and s is not new:
                s.close()
            return [new, new.code, {**held, name: new.code}, "", *trial_view(new)]

        begin.click(on_begin, [test_dd, code, stored_id, session],
                    [session, code, stored_id, listen_status, *listen_outputs],
                    api_name="listen_start")

        def report(clip: str, what: str):
            """A player's play, or pause/end, with every player's position."""
            def f(s, where):
                if s is not None:
                    pos = _positions(where).get(clip)
                    (s.play if what == "play" else s.pause)(clip, pos)
                return s
            return f

        for clip, player in (("prompt", p_audio), ("A", a_audio), ("B", b_audio)):
            for what, event in (("play", player.play), ("pause", player.pause),
                                ("end", player.stop)):
                event(report(clip, what), [session, positions], session, js=POSITIONS_JS,
                      show_progress="hidden", api_name=f"listen_{what}_{clip}",
                      concurrency_limit=None)

        def on_tick(s, where):
            if s is None or s.trial is None:
                return [gr.update()] * 4
            s.tick(_positions(where))
            ok = s.unlocked()
            heard = s.listened()
            msg = "" if ok else ("still to hear: " + ", ".join(
                f"{c} ({heard[c]:.1f} of {s.needed[c]:.1f} s)" for c in s.waiting_for()))
            return [msg, *[gr.update(interactive=ok)] * 3]

        tick.tick(on_tick, [session, positions], [listen_status, vote_a, vote_none, vote_b],
                  js=POSITIONS_JS, show_progress="hidden", api_name="listen_tick",
                  concurrency_limit=None)

        def on_vote(choice):
            def f(s, r):
                if s is None:
                    return [s, "**press Start first**", *trial_view(None)]
                try:
                    saved = s.vote(choice, int(r) if r and choice != "none" else None)
                except (UserError, ValueError) as e:
                    return [s, f"**{e}**", *trial_view(s)]
                said = (f"Vote saved ({s.done} of {s.total})." if saved is not None else
                        "You had answered that trial in another window; here is the next.")
                return [s, said, *trial_view(s)]
            return f

        for choice, button in (("A", vote_a), ("none", vote_none), ("B", vote_b)):
            button.click(on_vote(choice), [session, rating],
                         [session, listen_status, *listen_outputs],
                         api_name=f"listen_vote_{choice}")

        def on_results(name, s):
            try:
                return app.results(name, s)
            except UserError as e:
                return f"**{e}**"

        res_go.click(on_results, [res_dd, session], res_md, api_name="results")
    return page, app


def launch(cfg: AppConfig, block: bool = True) -> tuple[gr.Blocks, App]:
    page, app = build(cfg)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=cfg.host, server_port=int(cfg.port), share=False,
                prevent_thread_lock=not block, quiet=not block, theme=theme(),
                allowed_paths=[str(app.samples)], max_file_size=int(cfg.max_upload_mb * 1e6),
                footer_links=[], show_error=True, head=HEAD)
    return page, app


def wait() -> None:  # the command line keeps the server up until Ctrl-C
    while True:
        time.sleep(3600)
