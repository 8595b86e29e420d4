"""The names the command line offers before any command runs (argparse's ``choices``), kept free of
torch and of the rest of fastcolor so that ``fastcolor --help`` and ``--version`` import neither
(tests/test_import.py checks it)."""
from __future__ import annotations

__all__ = ["MODELS", "PHOTOS", "HELD_OUT"]

#: CLI model names -> :data:`fastcolor.models.PRESETS` keys.
MODELS = {
    "zhang": "zhang", "zhang-small": "zhang_small", "zhang-tiny": "zhang_tiny",
    "fusion": "fusion", "fusion-small": "fusion_small", "fusion-tiny": "fusion_tiny",
}

#: ``fastcolor demo``'s photos: the skimage.data colour photos (``cat`` is ``chelsea`` again, so it
#: is left out).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "motorcycle")
#: The default photo the demo keeps back for evaluation and the full-resolution colorization.
HELD_OUT = "coffee"
