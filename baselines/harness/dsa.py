"""DSA and IDC's augmentation for the harness: the implementation lives in
:mod:`dm_plugins.augment` (installed with the library, so a fork can pass
``augment=DSA().per_image`` or ``idc_per_image()`` to ``ExpertPool.load_or_train``)."""
from dm_plugins.augment import OPS, DSA, idc_per_image  # noqa: F401
