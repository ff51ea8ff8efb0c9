"""TorchServe handlers: thin glue between HTTP requests and cam_engine.

- :mod:`handlers.base` - the shared base (:class:`~handlers.base.CamHandler`): request parsing,
  option validation, batching, heatmap mapping and encoding, per-request errors, metrics;
- :mod:`handlers.classifier` - image classifiers;
- :mod:`handlers.detection`, :mod:`handlers.segmentation`, :mod:`handlers.embedding` - detectors
  (a CAM per box), segmenters (class mask plus class-region CAMs), embedding models (similarity to a
  concept); :mod:`handlers.targets` - their targets that pick a box/region from the same forward pass;
- :mod:`handlers.config` - the validated ``handler:`` section of model-config.yaml;
- :mod:`handlers.preprocess` - resize/letterbox/crop and its exact inverse;
- :mod:`handlers.architectures` - architecture name -> builder registry, the reshape-name map and the
  strict state-dict loader;
- :mod:`handlers.audit` - the prediction audit trail, a package by job (auditor, summary, sinks, writer,
  metrics; :mod:`handlers.audit.report` and ``python -m handlers.audit`` are offline tools that archives
  leave out).
"""
