"""Feature explorer: PCA maps, nearest training images, point correspondences and probe heatmaps of a DDAE model.

    python space/app.py [--model examples/ddae-cifar10-cpu] [--port 7860]

The pictures come from ``ddae_diffusers.visualize``; this file only lays out the page and turns a usage error
into a message in it. Offline it runs on the shipped reference model and the embedded CIFAR-10 sample.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from ddae_diffusers.data import load_split  # noqa: E402
from ddae_diffusers.errors import UsageError  # noqa: E402
from ddae_diffusers.visualize import (  # noqa: E402
    correspondences,
    dataset_features,
    default_picks,
    load_model,
    nearest_neighbours,
    pca_maps,
    probe_pictures,
)

DEFAULT_MODEL = os.path.relpath(ROOT / "examples" / "ddae-cifar10-cpu")  # relative to where the app was started
DEFAULT_PROBE = os.path.relpath(ROOT / "examples" / "ddae-cifar10-cpu-probe")
SAMPLE = str(ROOT / "data" / "cifar10-sample")
SAMPLES = 12  # test images offered in the page
CLICK_SIDE = 256  # pixels of the clickable copy of image A
# small images fill their box, without smoothing
CSS = """#image img, #image_b img {image-rendering: pixelated}
#image img, #image_b img, #maps img, #neighbours img, #matches img {width: 100%; height: 100%; object-fit: contain}"""


# Gradio runs the handlers of different events in parallel threads, but a forward with hooks is not thread-safe on a
# shared model (one thread's hooks would see the other's forward): the page's handlers run one at a time.
ONE_AT_A_TIME = threading.RLock()


def shown(handler):
    """Runs a page handler, one at a time; a usage error (or any other) becomes one message in the page, never a
    traceback."""

    @functools.wraps(handler)
    def run(*args, **kwargs):
        try:
            with ONE_AT_A_TIME:
                return handler(*args, **kwargs)
        except gr.Error:
            raise
        except UsageError as error:
            raise gr.Error(" ".join(str(error).split())) from None
        except Exception as error:  # a bug still shows as one line in the page; the server log has the rest
            raise gr.Error(f"{type(error).__name__}: {' '.join(str(error).split())}") from error

    return run


class Explorer:
    """What the page holds: loaded models, the embedded sample and the training features computed so far."""

    def __init__(self, bank_size: int, cache_dir: str | None):
        self.models: dict[str, object] = {}
        self.banks: dict[tuple, object] = {}
        self.cache_dir = cache_dir
        self.train = load_split(SAMPLE, "train", bank_size)
        test = load_split(SAMPLE, "test", SAMPLES)
        names = test.features["label"].names
        self.samples = [(image.convert("RGB"), names[label]) for image, label in zip(test["img"], test["label"],
                                                                                      strict=True)]

    def model(self, source: str):
        source = (source or "").strip()
        if source not in self.models:
            self.models = {source: load_model(source)}  # one model at a time
        return self.models[source]

    # ------------------------------------------------------------------ handlers
    def load(self, source: str):
        model = self.model(source)
        backbone = model.backbone
        picks = default_picks(backbone)
        levels = backbone.noise_axis.default_levels()
        chosen = [level for level in levels if level in (0, 10, 100)] or levels[:3]
        kind = "classifier (DDAEForImageClassification)" if model.classifier is not None else "diffusion model"
        status = (f"Loaded **{source.strip()}**: {backbone.family.name} {kind}, {len(backbone.layer_names())} "
                  f"layers, images {backbone.image_size}px.")  # fmt: skip
        return (status, gr.update(choices=backbone.layer_names(), value=picks),
                gr.update(choices=[str(level) for level in levels], value=[str(level) for level in chosen]),
                source.strip())

    def cells(self, source: str, layers, levels):
        model = self.model(source)
        if not layers:
            raise UsageError("Pick at least one layer.")
        if not levels:
            raise UsageError("Pick at least one noise level.")
        parse = int if model.backbone.objective == "ddpm" else float
        return model, list(layers), [parse(level) for level in levels]

    def maps(self, source: str, image: Image.Image | None, layers, levels, progress=gr.Progress()):  # noqa: B008
        if image is None:
            return None, None
        model, layers, levels = self.cells(source, layers, levels)
        result = pca_maps(model.backbone, [image], layers, levels,
                          progress=lambda done, what: progress(done, desc=what))  # fmt: skip
        prediction = None
        if model.classifier is not None:
            prediction = dict(model.predict([image], top=5)[0])
        return result.figure, prediction

    def neighbours(self, source: str, image: Image.Image | None, layers, levels, progress=gr.Progress()):  # noqa: B008
        if image is None:
            raise UsageError("Pick a sample or upload an image first.")
        model, layers, levels = self.cells(source, layers, levels)
        key = (source, layers[0], levels[0])
        if key not in self.banks:
            self.banks[key] = dataset_features(model.backbone, self.train, layers[0], levels[0],
                                               cache_dir=self.cache_dir,
                                               progress=lambda done, what: progress(done, desc=what))[0]
        bank = self.banks[key]
        result = nearest_neighbours(model.backbone, [image], self.train, layers[0], levels[0], k=6,
                                    bank=bank)  # fmt: skip
        return result.figure

    def clickable(self, source: str, image: Image.Image | None):
        if image is None:
            return None
        side = self.model(source).backbone.image_size or CLICK_SIDE
        square = image.convert("RGB").resize((side, side), Image.BILINEAR)
        return square.resize((CLICK_SIDE, CLICK_SIDE), Image.NEAREST)

    def correspond(self, source: str, image_a, image_b, layers, levels, event: gr.SelectData):
        if image_a is None or image_b is None:
            raise UsageError("Give both images (A and B) first.")
        model, layers, levels = self.cells(source, layers, levels)
        side = model.backbone.image_size
        x, y = event.index
        point = [[min(side - 1, int(x * side / CLICK_SIDE)), min(side - 1, int(y * side / CLICK_SIDE))]]
        return correspondences(model.backbone, image_a, image_b, point, layers[0], levels[0], ensemble=2).figure

    def probe(self, folder: str):
        pictures, summary = probe_pictures(folder)
        return pictures, summary


def build(explorer: Explorer, model: str) -> gr.Blocks:
    """The page."""
    with gr.Blocks(title="DDAE feature explorer") as page:
        gr.Markdown("# DDAE feature explorer\nNoise an image slightly, run the denoiser, look at its features.")
        source = gr.State(model)
        with gr.Row():
            model_box = gr.Textbox(model, label="Model folder or Hub id", scale=4, elem_id="model")
            load_button = gr.Button("Load", scale=1, elem_id="load")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(explorer.samples[0][0], type="pil", label="Image A", sources=["upload"], height=200,
                                 image_mode="RGB", elem_id="image")  # fmt: skip
                gallery = gr.Gallery(explorer.samples, label="Samples (embedded CIFAR-10 test images)", columns=6,
                                     height=160, allow_preview=False, elem_id="samples")  # fmt: skip
            with gr.Column(scale=1):
                layers = gr.Dropdown([], multiselect=True, label="Layers (the first one for neighbours and "
                                     "correspondences)", elem_id="layers")  # fmt: skip
                levels = gr.CheckboxGroup([], label="Noise levels", elem_id="levels")
                prediction = gr.Label(label="Prediction (classifier models)", num_top_classes=5,
                                      elem_id="prediction")  # fmt: skip
        with gr.Tab("PCA maps"):
            maps = gr.Image(label="PCA of the dense features (colours fitted per layer and level)", type="pil",
                            interactive=False, height=360, elem_id="maps")  # fmt: skip
        with gr.Tab("Nearest training images"):
            find = gr.Button("Find nearest training images", elem_id="find")
            neighbours = gr.Image(label="Nearest training images", type="pil", interactive=False, height=300,
                                  elem_id="neighbours")  # fmt: skip
        with gr.Tab("Correspondence"):
            with gr.Row():
                click = gr.Image(label="Click a point of image A", type="pil", interactive=False, elem_id="click")
                image_b = gr.Image(explorer.samples[1][0], type="pil", label="Image B", sources=["upload"], height=256,
                                   image_mode="RGB", elem_id="image_b")  # fmt: skip
            matches = gr.Image(label="Best match in B", type="pil", interactive=False, height=360, elem_id="matches")
        with gr.Tab("Probe heatmap"):
            with gr.Row():
                probe_box = gr.Textbox(DEFAULT_PROBE, label="Probe folder (ddae-probe output)", scale=4)
                probe_button = gr.Button("Show", scale=1, elem_id="show_probe")
            probe_summary = gr.Markdown()
            heatmaps = gr.Gallery(label="Probe heatmaps", columns=2, height=640, object_fit="contain",
                                  elem_id="heatmaps")  # fmt: skip

        view_inputs = [source, image, layers, levels]
        view_outputs = [maps, prediction]
        load_event = dict(fn=shown(explorer.load), inputs=model_box, outputs=[status, layers, levels, source])
        for trigger in (load_button.click, model_box.submit, page.load):
            trigger(**load_event).success(shown(explorer.maps), view_inputs, view_outputs).then(
                shown(explorer.clickable), [source, image], click)
        def pick(event: gr.SelectData) -> Image.Image:
            return explorer.samples[event.index][0]

        gallery.select(pick, None, image)
        image.change(shown(explorer.maps), view_inputs, view_outputs).then(
            shown(explorer.clickable), [source, image], click)
        layers.input(shown(explorer.maps), view_inputs, view_outputs)
        levels.input(shown(explorer.maps), view_inputs, view_outputs)
        find.click(shown(explorer.neighbours), view_inputs, neighbours)
        click.select(shown(explorer.correspond), [source, image, image_b, layers, levels], matches)
        probe_button.click(shown(explorer.probe), probe_box, [heatmaps, probe_summary])
    return page


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder or Hub id shown first")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines (a Space does)")
    parser.add_argument("--bank_size", type=int, default=1000,
                        help="training images of the embedded sample searched for neighbours (at most 5000)")
    parser.add_argument("--cache_dir", default=None,
                        help="a feature cache folder (e.g. ddae-probe's): training features are read from it when "
                             "it holds them, and written there otherwise")  # fmt: skip
    args = parser.parse_args(argv)
    explorer = Explorer(args.bank_size, args.cache_dir)
    theme = gr.themes.Default(font=["sans-serif"], font_mono=["monospace"])  # no web fonts: works offline
    build(explorer, args.model).queue().launch(server_name=args.host, server_port=args.port, theme=theme,
                                              css=CSS)


if __name__ == "__main__":
    main()
