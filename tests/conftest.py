"""Test-wide settings: one torch thread (the tiny models run faster without thread
oversubscription on a shared 2-core machine, and timings are steadier)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
