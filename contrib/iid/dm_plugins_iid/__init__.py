"""IID (Deng et al., CVPR 2024, "Exploiting Inter-sample and Inter-feature Relations in Dataset
Distillation") as two third-party dm_plugins plugins.

The paper adds two constraints to a distribution-matching loss,
``L = L_DM/IDM + lambda_CC * L_CC + lambda_CM * L_CM``:

* ``iid-cm`` (:class:`CovarianceMatching`): L_CM, the local feature covariance of each class's
  synthetic images matched to that of its real images (hook ``dm_feature_loss``);
* ``iid-cc`` (:class:`ClassCentralization`): L_CC, each class's synthetic images pulled
  together in a trained network's feature space (hook ``dm_auxiliary_loss``).

Both are found through the ``dm_plugins`` entry-point group once this distribution is
installed (``pip install -e contrib/iid``); this package imports only dm_plugins' public names.
"""
from .centralization import ClassCentralization, class_centralization_loss
from .covariance import CovarianceMatching, covariance_matching_loss, local_covariance

__version__ = "0.1.0"

__all__ = ["CovarianceMatching", "ClassCentralization", "covariance_matching_loss",
           "local_covariance", "class_centralization_loss", "__version__"]
