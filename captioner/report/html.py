"""report.html: one self-contained page (every image embedded) with the table, the figures, and test images
with their references, every variant's caption and, for attention variants, the attention maps. A variant with
several seeds is shown by the run of its first seed (captions differ from seed to seed; one is enough to read)."""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

from ..data.vocabulary import normalize
from .runs import Run

log = logging.getLogger(__name__)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _pil_uri(image, fmt: str = "PNG", max_width: int | None = None) -> str:
    if max_width and image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)))
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return _data_uri(buf.getvalue(), f"image/{fmt.lower()}")


def _load_image(path: str | None):
    from PIL import Image

    if not path or not Path(path).is_file():
        return None
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        log.warning("cannot read %s: %s", path, e)
        return None


def attention_maps(run: Run, images: dict) -> tuple[dict[str, dict], str | None]:
    """Attention maps of one attention-family run for the given {key: PIL image}: ({key: {"caption", "uri"}},
    note). `captioner.caption` is optional (another module); without it, or on any failure there, the report is
    still written and the note says why the maps are missing."""
    try:
        from captioner.caption import ImageCaptioner, attention_figure
    except (ImportError, AttributeError) as e:
        return {}, f"attention maps skipped: captioner.caption.ImageCaptioner is not available ({e})"
    except Exception as e:  # e.g. a half-written module that does not even import
        return {}, f"attention maps skipped: importing captioner.caption failed: {type(e).__name__}: {e}"
    ckpt = run.metrics.get("best_checkpoint")
    if not ckpt or not Path(ckpt).is_file():
        return {}, f"attention maps skipped: best checkpoint {ckpt!r} not found"
    keys = [k for k, im in images.items() if im is not None]
    if not keys:
        return {}, "attention maps skipped: none of the sample images could be read"
    try:
        captioner = ImageCaptioner(ckpt, device="cpu")
        results = captioner.caption([images[k] for k in keys], attention=True)
        maps = {}
        for key, result in zip(keys, results):
            if result.get("attention") is not None:
                figure = attention_figure(images[key], result["words"], result["attention"])
                # JPEG: heat maps over photos are far smaller than PNG, and the page embeds them all
                maps[key] = {"caption": result["caption"],
                             "uri": _pil_uri(figure.convert("RGB"), "JPEG", max_width=1600)}
        return maps, None if maps else "attention maps skipped: the captioner returned no attention"
    except Exception as e:  # an optional extra must not cost the user the rest of the report
        log.warning("attention maps of %s failed: %s: %s", run.label, type(e).__name__, e)
        return {}, f"attention maps skipped: {type(e).__name__}: {e}"


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; vertical-align: top; }
td.text, th { text-align: left; }
.sample { display: flex; gap: 1.5em; margin: 1.5em 0; border-top: 1px solid #ddd; padding-top: 1em; }
.sample img.photo { width: 224px; height: auto; }
.sample td { text-align: left; }
.note { color: #777; font-size: 0.85em; }
img.figure { max-width: 100%; }
img.attention { max-width: 100%; display: block; margin-top: 4px; }
"""


def render_html(title: str, header: list[str], rows: list, legend: list[str], missing: list[dict],
                figures: dict[str, Path], samples: list[dict], runs: list[Run], maps: dict[str, dict],
                map_notes: dict[str, str], caption_note: str | None = None) -> str:
    """`runs`: the run whose captions stand for each variant; `caption_note`: which seed they come from."""
    e = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{HTML_STYLE}</style></head><body><h1>{e(title)}</h1>"]
    out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    for cells in rows:
        tds = []
        for i, (text, bold) in enumerate(cells):
            cls = " class='text'" if i < 3 else ""
            tds.append(f"<td{cls}>{'<b>' + e(text) + '</b>' if bold else e(text)}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</table>")
    out += [f"<p class='note'>{e(line.replace('**', ''))}</p>" for line in legend]
    if missing:
        out.append("<h3>Missing runs</h3><ul>" + "".join(
            f"<li><code>{e(m['run'])}</code>: {e(m['reason'])}</li>" for m in missing) + "</ul>")
    for name, path in figures.items():
        out.append(f"<h2>{e(path.stem.replace('_', ' '))}</h2>"
                   f"<img class='figure' alt='{e(name)}' src='{_data_uri(path.read_bytes(), 'image/png')}'>")
    if samples:
        out.append(f"<h2>Test images (first {len(samples)} by key)</h2>")
        if caption_note:
            out.append(f"<p class='note'>{e(caption_note)}</p>")
    for note_label, note in map_notes.items():
        out.append(f"<p class='note'>{e(note_label)}: {e(note)}</p>")
    for s in samples:
        if s["uri"]:
            photo = f"<img class='photo' alt='{e(s['key'])}' src='{s['uri']}'>"
        elif s["path"]:
            photo = f"<p class='note'>image not found: {e(str(s['path']))}</p>"
        else:  # predictions.jsonl written before train.py recorded the path
            photo = "<p class='note'>no image_path in predictions.jsonl</p>"
        refs = "".join(f"<li>{e(r)}</li>" for r in s["references"])
        caps = []
        for run in runs:
            if run.predictions is None:
                continue
            cell = e(run.predictions[s["key"]]["hypothesis"])
            m = maps.get(run.label, {}).get(s["key"])
            if m:
                same = normalize(m["caption"]) == normalize(run.predictions[s["key"]]["hypothesis"])
                differs = "" if same else \
                    f"<div class='note'>maps of the caption decoded now: {e(m['caption'])}</div>"
                cell += f"{differs}<img class='attention' alt='attention of {e(run.label)}' src='{m['uri']}'>"
            caps.append(f"<tr><th>{e(run.label)}</th><td>{cell}</td></tr>")
        out.append(f"<div class='sample'><div>{photo}<div class='note'>{e(s['key'])}</div></div>"
                   f"<div><b>references</b><ul>{refs}</ul><table>{''.join(caps)}</table></div></div>")
    out.append("</body></html>")
    return "\n".join(out)


def sample_images(runs: list[Run], best: Run, keys: list[str], n: int) -> tuple[dict, list[dict]]:
    """The first `n` test images by key: ({key: PIL image or None}, [{"key", "path", "references", "uri"}])."""
    # references and image paths are the same in every run (checked by key); take them from one that has them
    ref_run = next((r for r in [best, *runs] if r.predictions is not None), None)
    images, samples = {}, []
    for key in keys[:max(n, 0)]:
        row = ref_run.predictions[key]
        images[key] = _load_image(row.get("image_path"))
        samples.append({"key": key, "path": row.get("image_path"), "references": row["references"],
                        "uri": _pil_uri(images[key], "JPEG", max_width=448) if images[key] is not None else None})
    return images, samples


def attention_maps_of(runs: list[Run], images: dict, samples: list[dict]) -> tuple[dict, dict[str, str]]:
    """Attention maps of every attention-family run given ({label: {key: map}}: the runs whose captions the page
    shows) and why any are missing."""
    maps, map_notes = {}, {}
    for run in runs:
        if run.metrics.get("family") == "attention" and samples:
            maps[run.label], note = attention_maps(run, images)
            if note:
                map_notes[run.label] = note
    return maps, map_notes
