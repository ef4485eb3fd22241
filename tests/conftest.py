"""Shared test settings: single-threaded torch (tiny nets are dominated by thread
synchronisation, and CI has 2 cores), deterministic default dtype untouched."""

import torch

torch.set_num_threads(1)
