"""Faithfulness metrics for CAMs, with grad-cam 1.5.7's call: ``metric(input_tensor, cams, targets, model)``.

Each returns per-image scores (float32 NumPy ``[B]``): the change of the target score when the input
is perturbed according to the CAM.

* `cam_engine.cam_mult_image`: multiply the input by the CAM (CamMultImageConfidenceChange,
  DropInConfidence, IncreaseInConfidence).
* `cam_engine.road`: ROAD (Rong et al., ICML 2022), removing the most/least relevant pixels by noisy
  linear imputation (ROADMostRelevantFirst, ROADLeastRelevantFirst, their averages over
  percentiles, and ROADCombined).
"""

from .arcc import ARCC, Coherency, Complexity, batch_pearson_coherency
from .cam_mult_image import (
    CamMultImageConfidenceChange,
    DropInConfidence,
    IncreaseInConfidence,
    multiply_tensor_with_cam,
)
from .perturbation_confidence import (
    AveragerAcrossThresholds,
    PerturbationConfidenceMetric,
    RemoveLeastRelevantFirst,
    RemoveMostRelevantFirst,
)
from .road import (
    NoisyLinearImputer,
    ROADCombined,
    ROADLeastRelevantFirst,
    ROADLeastRelevantFirstAverage,
    ROADMostRelevantFirst,
    ROADMostRelevantFirstAverage,
)

__all__ = [
    "ARCC",
    "Coherency",
    "Complexity",
    "batch_pearson_coherency",
    "AveragerAcrossThresholds",
    "CamMultImageConfidenceChange",
    "DropInConfidence",
    "IncreaseInConfidence",
    "NoisyLinearImputer",
    "PerturbationConfidenceMetric",
    "ROADCombined",
    "ROADLeastRelevantFirst",
    "ROADLeastRelevantFirstAverage",
    "ROADMostRelevantFirst",
    "ROADMostRelevantFirstAverage",
    "RemoveLeastRelevantFirst",
    "RemoveMostRelevantFirst",
    "multiply_tensor_with_cam",
]
