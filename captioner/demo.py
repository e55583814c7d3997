"""A local web demo of a trained captioner (Gradio, the optional extra `[demo]`).

usage: captioner-demo MODEL_DIR_OR_CKPT [--host 127.0.0.1] [--port 7860] [--device auto] [--examples N]
       (also `python -m captioner.demo`)

Upload or drop an image and get its caption: greedy or beam search, trigram blocking, or sampled (with a
temperature) for other captions of the same image; for the attention variants, the attention map behind every
word. When the model is a training checkpoint, the test images of its run are offered as examples. A file that is
not a readable image (a text file named .jpg, a truncated JPEG, one over the pixel limit) gets a clear message in
place of the caption; the server goes on serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import UserError, reported_exit_status

log = logging.getLogger(__name__)


def example_images(model_path: str | Path, n: int) -> list[str]:
    """Up to n test images of the run a checkpoint comes from (its predictions.jsonl), as examples."""
    path = Path(model_path).expanduser()
    preds = path.resolve().parent.parent / "predictions.jsonl" if path.is_file() else None
    if n <= 0 or preds is None or not preds.is_file():
        return []
    images = []
    for line in preds.read_text().splitlines():
        try:
            image = json.loads(line).get("image_path")
        except json.JSONDecodeError:
            continue
        if image and Path(image).is_file():
            images.append(str(image))
        if len(images) >= n:
            break
    return images


def caption_upload(captioner, file, decoding: str, beam_size: int, block_trigrams: bool, temperature: float):
    """(caption or error message, the image as read, [(attention figure, word)]) of one uploaded file; never
    raises for a bad file."""
    from .caption import attention_figure
    from .images import ImageReadError, load_image

    if file is None:
        return "Upload or drop an image first.", None, []
    path = file if isinstance(file, str) else getattr(file, "name", str(file))
    try:
        image = load_image(path)
        settings = dict(block_trigrams=bool(block_trigrams))
        if decoding == "sample":
            settings.update(sample=True, temperature=float(temperature))
        else:
            settings.update(beam_size=int(beam_size) if decoding == "beam" else 1)
        (result,) = captioner.caption_images([image], attention=captioner.spatial,
                                             settings=captioner.decode_settings(**settings))
    except (ImageReadError, UserError) as e:
        return f"error: {Path(path).name}: {str(e).split(': ', 1)[-1]}", None, []
    except Exception as e:  # any other failure of one request must not take the server down
        log.exception("captioning %s failed", path)
        return f"error: {Path(path).name}: could not be captioned ({type(e).__name__})", None, []
    maps = []
    if result["attention"] is not None:
        maps = [(attention_figure(image, [w], m[None]), w) for w, m in zip(result["words"], result["attention"])]
    return result["caption"], image, maps


def build_app(captioner, examples: list[str] = (), title: str = "captioner"):
    """The Gradio Blocks app around a `captioner.Captioner`."""
    import gradio as gr

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}\nUpload or drop an image to caption it. Model: `{captioner.model.hparams.model_name}`"
                    f" ({'attention maps for each word' if captioner.spatial else 'one pooled image vector'}).")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="image", file_types=["image"], type="filepath", elem_id="upload")
                decoding = gr.Radio(["greedy", "beam", "sample"], value="greedy", label="decoding")
                beam = gr.Slider(2, 10, value=3, step=1, label="beam size (beam)")
                temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.1, label="temperature (sample)")
                block = gr.Checkbox(False, label="block repeated trigrams")
                run = gr.Button("Caption", variant="primary", elem_id="caption-button")
            with gr.Column():
                caption = gr.Textbox(label="caption", interactive=False, elem_id="caption")
                shown = gr.Image(label="the image as read", type="pil", interactive=False, height=260)
                maps = gr.Gallery(label="attention per word", columns=4, visible=captioner.spatial)
        if examples:
            gr.Examples(examples=[[e] for e in examples], inputs=[upload], label="test images of the run")
        inputs = [upload, decoding, beam, block, temperature]
        run.click(lambda *a: caption_upload(captioner, *a), inputs=inputs, outputs=[caption, shown, maps])
    return app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="captioner-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model directory (captioner-export) or a checkpoint")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--examples", type=int, default=8, help="test images of a checkpoint's run to offer")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the demo works offline
    try:
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise UserError("captioner-demo needs Gradio: pip install -e '.[demo]'") from None
        from .api import Captioner

        captioner = Captioner.from_pretrained(args.model, device=args.device)
        app = build_app(captioner, example_images(args.model, args.examples))
    except Exception as e:  # a user error is one line and exit status 2; a bug keeps its traceback
        return reported_exit_status(e)
    print(f"captioner-demo: serving {args.model} on http://{args.host}:{args.port}", flush=True)
    app.queue(default_concurrency_limit=1)  # one caption at a time: the model is not shared between threads
    app.launch(server_name=args.host, server_port=args.port, show_error=True, share=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
