"""TorchServe handlers: thin glue between HTTP requests and cam_engine, as packages by job.

- :mod:`handlers.config` - the validated ``handler:`` section of model-config.yaml;
- :mod:`handlers.serving` - the shared base handler (:class:`~handlers.serving.base.CamHandler`),
  request protocols (native, KServe v1/v2), batch orchestration, decoding and encoding, the
  resize/letterbox/crop geometry and its exact inverse, limits, metrics, thread sizing, the fast
  forward path and per-request errors;
- :mod:`handlers.tasks` - the task handlers (classifier, detection, segmentation, embedding, clip)
  and the targets that pick a box/region/class from the same forward pass;
- :mod:`handlers.models` - model builders and adapters: architectures (name -> builder, reshape,
  strict state-dict loading), CLIP, YOLO, torchvision R-CNN heads;
- :mod:`handlers.audit` - the prediction audit trail, an observer the handler is given (auditor,
  summary, sinks, writer, metrics; :mod:`handlers.audit.report` and ``python -m handlers.audit`` are
  offline tools that archives leave out).
"""
