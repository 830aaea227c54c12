"""lmkit: pretraining and adapting language models on PyTorch Lightning, composed by Hydra."""
from lmkit.plugins import hookimpl
from lmkit.registry import Component

__all__ = ["hookimpl", "Component"]
__version__ = "0.1.0"
