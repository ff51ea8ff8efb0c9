"""Test helpers shared by the suite and the benchmarks: fake TorchServe context, synthetic data,
tiny models, the session TorchServe and its archives, the grad-cam oracle and suite runner."""
