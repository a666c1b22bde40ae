"""The method room: the distillation methods the harness runs, as host loops and pure functions.

* :mod:`baselines.methods.idm` -- IDM as a host (:class:`~baselines.methods.idm.IDM`), with its
  model queue in :mod:`baselines.methods.idm_queue`;
* :mod:`baselines.methods.dance` -- DANCE as a host (:class:`~baselines.methods.dance.DANCE`);
* :mod:`baselines.methods.coresets` -- greedy coreset selection (herding, k-center).

DM's host is the library's own :class:`dm_plugins.DMHost`. Every host optimises its synthetic set
with the pieces of :mod:`dm_plugins.synthetic` (state and checkpoint part, image step, run loop,
argument checks, class-shard helpers). The methods call no dm_plugins hook (the adapters in
``adapters/`` graft the hooks on) and know nothing of the research harness: no module here
imports ``baselines.harness``; the command lines (``baselines/*.py``) wire the two together.
"""
