"""captioner: frozen pretrained image encoders + word decoders, trained and compared with Lightning and Hydra.

`from captioner import Captioner`: a trained captioner (a model directory or a checkpoint), images in, captions out
(captioner.api).
"""

__version__ = "0.1.0"
__all__ = ["Captioner"]


def __getattr__(name: str):
    # imported on first use: `import captioner.<module>` (every command) need not load the API's dependencies
    if name == "Captioner":
        from .api import Captioner

        return Captioner
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
