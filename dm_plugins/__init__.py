"""dm_plugins: PTLM's capacity matching, pseudo-trajectory matching and pseudo-label matching as
pluggy plugins for distribution-matching (DM) dataset distillation."""
from .capacity import CapacityMatching, capacity_keep_mask
from .context import DistillContext
from .data import ClassIndexedData, ClassIndexedTensors
from .errors import ExpertError, PluginError
from .experts import Expert, ExpertPool, ExpertRecipe
from .hookspecs import hookimpl, hookspec
from .loop import DMHost, class_means
from .options import PluginOption
from .manager import PluginSet
from .registry import (available_plugins, check_plugin_names, parse_plugin_names,
                       plugins_need_experts)
from .pseudo_label import PseudoLabelMatching
from .trajectory import PseudoTrajectoryMatching, injection_ratio

__version__ = "0.1.0"

__all__ = [
    "CapacityMatching", "PseudoTrajectoryMatching", "PseudoLabelMatching", "PluginSet",
    "DistillContext", "DMHost", "ExpertPool", "Expert", "ExpertRecipe", "ClassIndexedData",
    "ClassIndexedTensors", "PluginError", "ExpertError", "PluginOption", "hookimpl", "hookspec",
    "available_plugins", "parse_plugin_names", "check_plugin_names", "class_means",
    "plugins_need_experts", "capacity_keep_mask", "injection_ratio", "__version__",
]
