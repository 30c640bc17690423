"""Looking at a model or a run without training it: cost profiles (memory, FLOPs, time) and token maps."""
