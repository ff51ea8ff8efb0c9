"""Model configs (configs/*.yaml) and the archive builder (python -m model_store.build)."""
