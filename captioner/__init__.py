"""captioner: frozen pretrained image encoders + word decoders, trained and compared with Lightning and Hydra."""

__version__ = "0.1.0"
