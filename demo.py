r"""A web demo (Gradio): upload a video, type a query, get the model's reasoning and its span, drawn on
the video's timeline; a button moves the player to the span's start.

    # the tiny preset's model on the CPU; then open http://127.0.0.1:7860
    python demo.py --model runs/tiny/grpo/model --nframes 16 --max-pixels 3136 --min-pixels 3136
    # open on an example, already answered (what tests/screenshot_demo.py photographs)
    python demo.py --model runs/tiny/grpo/model --nframes 16 --max-pixels 3136 --min-pixels 3136 \
        --video runs/tiny/data/videos/synth01500.mp4 --query "a yellow triangle moves across the screen"
    # a 7B model on a GPU machine, reachable from other machines
    python demo.py --model runs/paper/grpo/model --host 0.0.0.0 --port 7860

The answer is predict.py's, by the same code (`predict.answer`, greedy) and the same flags with the same
defaults (the paper's 64 frames of at most 128*28*28 px: pass the tiny preset's video flags for its
models), so the span equals `python predict.py` for the same video, query and flags;
tests/test_demo.py checks that through the app's API. The app listens on 127.0.0.1 unless --host says
otherwise, makes no share link and sends no analytics.

The API, for scripts (`gradio_client` is installed with gradio):

    from gradio_client import Client, handle_file
    reasoning, span, timeline_png = Client("http://127.0.0.1:7860").predict(
        handle_file("clip.mp4"), "the man opens the door", api_name="/answer")

`span` is [start, end] in seconds, or None when no span could be read (then `reasoning` holds the raw
answer). Only this file imports gradio: no training stage does.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no calls home

import data
import predict


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_model_flags(ap)  # --model, the video flags, --max-new-tokens, --dtype: as predict.py
    # --- the server
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=7860, help="port to listen on")
    # --- an example to open on
    ap.add_argument("--video", help="a video the page opens with")
    ap.add_argument("--query", help="a query the page opens with; with --video the page opens answered")
    return ap.parse_args(argv)


def build_app(model, processor, a: argparse.Namespace):
    import gradio as gr
    gen = predict.generation_kwargs(processor.tokenizer, a.max_new_tokens, temperature=0.0)
    pictures = tempfile.mkdtemp(prefix="vtg_demo_")

    @functools.lru_cache(maxsize=1)  # another query about the same upload does not decode it again
    def read(path: str):
        return predict.read_video(path, a.nframes, a.max_pixels, a.min_pixels)

    def ask(video_path: str | None, query: str | None):
        """(reasoning, [start, end] or None, timeline PNG) for one query about one video."""
        if not video_path:
            raise gr.Error("Upload a video first.")
        if not (query or "").strip():
            raise gr.Error("Type a query: what should the model find in the video?")
        try:
            video = read(video_path)
        except data.DataError as e:
            raise gr.Error(str(e)) from None
        (ans,) = predict.answer(model, processor, video_path, video, [query.strip()], gen, 1, a.nframes,
                                a.max_pixels, a.min_pixels)[0]
        frames, times, duration = predict.video_strip(video)
        png = tempfile.NamedTemporaryFile(suffix=".png", dir=pictures, delete=False).name
        predict.plot_timeline([predict.Row(frames, times, duration, f'"{ans.query}"', preds=[ans.span], gt=[],
                                           reasoning=ans.reasoning or ans.text)], png, width=9)
        if ans.span is None:
            return f"No span could be read from the answer. The raw answer:\n{ans.text}", None, png
        return ans.reasoning, ans.span, png

    def seek(span):
        """The player's position set to the span's start (gradio sets the <video>'s currentTime)."""
        return gr.Video(playback_position=span[0] if span else 0.0)

    # An example given on the command line is answered now, so the page opens with its answer shown and
    # the player at the span's start.
    first = ask(a.video, a.query) if a.video and a.query else (None, None, None)
    with gr.Blocks(title="VTG-R1: when does it happen?") as app:
        gr.Markdown(f"## When does it happen?\nUpload a video and say what to find in it: the model "
                    f"(`{a.model}`, {a.nframes} frames) reasons, then answers `[start, end]` in seconds.")
        with gr.Row():
            with gr.Column():
                video = gr.Video(value=a.video, label="video", sources=["upload"], elem_id="player", height=360,
                                 playback_position=first[1][0] if first[1] else 0.0)
                query = gr.Textbox(value=a.query, label="query", placeholder="the man opens the door")
                ask_btn = gr.Button("Answer", variant="primary")
            with gr.Column():
                span = gr.JSON(value=first[1], label="span: [start, end] in seconds")
                jump = gr.Button("Jump to the span's start")
                reasoning = gr.Textbox(value=first[0], label="reasoning", lines=5)
        timeline = gr.Image(value=first[2], label="the span on the video's timeline", type="filepath")
        # api_name: the one public endpoint, /answer; the seeks are browser plumbing, kept out of the API.
        gr.on([ask_btn.click, query.submit], ask, [video, query], [reasoning, span, timeline],
              api_name="answer").then(seek, span, video, api_visibility="private")
        jump.click(seek, span, video, api_visibility="private")
    return app


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.video:  # a bad example stops here with its reason, before the model loads
        try:
            predict.read_video(a.video, a.nframes, a.max_pixels, a.min_pixels)
        except data.DataError as e:
            sys.exit(f"error: {e}")
    model, processor = predict.load(a)
    # One request at a time (Gradio's default per event): generate holds the whole machine anyway.
    build_app(model, processor, a).queue().launch(server_name=a.host, server_port=a.port, share=False,
                                                  ssr_mode=False, show_error=True)


if __name__ == "__main__":
    main()
