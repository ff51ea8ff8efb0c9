"""Prediction auditing: a durable record of what a sample of live predictions looked at.

For every audited request (a ``sample_rate`` share of the valid requests of a model whose config has
``handler.audit.enabled: true``) one record is written:

- request id (TorchServe's ``x-request-id``), UTC timestamp, model name, version and weights source;
- SHA-256 and length of the submitted image bytes, image width and height;
- the response's top-k results (class predictions, detections, a mask's classes, similarities);
- the endpoint the request came to (``endpoint``: ``predictions`` or ``explanations``, from TorchServe's
  ``explain`` header, which KServe's ``:explain`` sets too) and whether its answer carried explanations;
- method, layers and targets of the heatmap;
- a heatmap summary per target, computed on the heatmap mapped onto the submitted image: the peak
  position in image pixels, the share of the heatmap's mass held by its top 10% of pixels, and its
  normalised entropy ``-sum(p log p) / log(n)`` with ``p = heatmap / sum(heatmap)`` over n pixels
  (1 = spread evenly, 0 = one pixel);
- optionally the heatmap as an 8-bit PNG (``store_heatmaps``) and the image bytes (``store_inputs``);
- optionally a faithfulness score (``faithfulness``): the drop in target confidence (softmax
  probability for classifiers) when the top 20% of the heatmap's pixels are removed from the model
  input, with the cost of that check in ms and, for class scores, the class on top afterwards
  (``after_top``: where the probability went). ``remove_top`` (or ``true``) sets the pixels to 0 after
  normalisation, i.e. the mean colour; ``road`` fills them by ROAD's noisy linear imputation
  (:class:`cam_engine.metrics.ROADMostRelevantFirst` at the 80th percentile), which leaves no
  sharp-edged hole for the model to react to, at the price of a sparse solve per heatmap on the CPU.

How it runs (:class:`Auditor`, one per handler):

1. :meth:`Auditor.sample` marks the sampled requests of a batch before the batched run. An audited
   request that asked for no explanation rides along in the same ``cam.run`` with the task's default
   targets (a classifier's top-1 class), so it costs a backward pass for its image but no forward
   pass; its response stays as it was (no ``explanations``).
2. :meth:`Auditor.record`, called after the batch's responses are built, fills each record's fields
   from the answer, runs one extra batched forward pass for the faithfulness check of all audited
   (image, target) pairs, copies the model-input CAMs to the host once (on a CPU server they are
   queued as they are) and queues the records. It never raises: a failure is logged and counted.
3. A background writer thread takes what is queued and finishes each record (the Auditor's
   ``prepare``: the CAMs mapped onto the submitted image, their summaries, the PNGs, the record id;
   then ``observe``: the drift metrics, once per record), hashes, writes the files and inserts the
   records in one transaction (or prints JSON lines), then commits. Nothing on the request path
   waits for that work or for the disk, except ``strict``'s wait for its batch's commit.

Durability ``async`` (default): a record is queued before its answer leaves the handler and committed
(WAL, ``synchronous=NORMAL``: survives SIGKILL and OOM kills, not a power cut) as soon as the writer
thread reaches it; records queued meanwhile share a transaction. ``strict``: the batch's records are
committed (``synchronous=FULL``) before the handler returns its answers; the README gives the cost.
SIGTERM and exit drain the queue (at most 10 s); ``torchserve --stop`` closes the workers' sockets ~2 s
later (``sys.exit`` drains too). An answer replaced for its size leaves no record. A full disk or bad
directory never fails a prediction: records are dropped, logged and counted (``AuditWriteErrors``).

``python -m handlers.audit report --since 24h --model NAME [--db PATH] [--out report.html]`` renders
a self-contained HTML report (see :mod:`handlers.audit.report`).

The package, by job: :mod:`~handlers.audit.auditor` (the observer a handler is given),
:mod:`~handlers.audit.summary` (heatmap maths), :mod:`~handlers.audit.sinks` (SQLite and stdout, the
schema), :mod:`~handlers.audit.writer` (the writer thread), :mod:`~handlers.audit.metrics`,
:mod:`~handlers.audit.report` and ``__main__`` (offline tools, left out of model archives).
"""

from __future__ import annotations

from .auditor import Auditor
from .sinks import DB_NAME, JSON_COLUMNS, PendingRecord, SqliteSink, StdoutSink, resolve_directory
from .summary import REMOVED_FRACTION, TOP_MASS_FRACTION, heatmap_summary, remove_top_pixels
from .writer import SHUTDOWN_FLUSH_S, AuditWriter

__all__ = [
    "Auditor",
    "AuditWriter",
    "PendingRecord",
    "SqliteSink",
    "StdoutSink",
    "heatmap_summary",
    "remove_top_pixels",
    "resolve_directory",
    "DB_NAME",
    "JSON_COLUMNS",
    "REMOVED_FRACTION",
    "SHUTDOWN_FLUSH_S",
    "TOP_MASS_FRACTION",
]
