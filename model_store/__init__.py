"""Model configs (configs/*.yaml), their label aliases (:mod:`model_store.labels`) and the archive builder
(python -m model_store.build)."""
