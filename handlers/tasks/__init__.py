"""Task handlers (one module per task; TorchServe loads the module named in the archive) and their targets."""
