"""Models of the study, each taking ``norm=`` any kind of ``bnlab.nn.NORM_KINDS``.

``build_model(name, input_shape, num_outputs, **options)`` is the registry; the classes are
plain ``nn.Module`` s with explicit, seeded initialization (``seed``, ``init_scale``). No training
logic lives here.
"""

from bnlab.models.init import INIT_SCHEMES, init_parameters
from bnlab.models.mlp import MLP, DeepLinearNetwork, LogisticRegression
from bnlab.models.registry import MODELS, build_model, model_options
from bnlab.models.vgg import VGG, VGG_PRESETS

__all__ = [
    "INIT_SCHEMES",
    "MLP",
    "MODELS",
    "VGG",
    "VGG_PRESETS",
    "DeepLinearNetwork",
    "LogisticRegression",
    "build_model",
    "init_parameters",
    "model_options",
]
