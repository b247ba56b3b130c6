"""The same random numbers for every run of the model during a speedup.

A model may draw random numbers in ``forward`` even in eval mode: ViT-MAE shuffles its patches by
``torch.rand`` noise, a variational autoencoder samples its latent. Verification compares what the
sped-up model returns with what the trace recorded, so both runs must draw the same numbers: each run
starts from the generator state the call found, and the call leaves that state as it found it (it
draws nothing the user's next forward would miss).
"""

from __future__ import annotations

import torch


class RandomDraws:
    """The default generators' states when the speedup started (the CPU's, and the GPUs' in use)."""

    def __init__(self) -> None:
        self._cpu = torch.get_rng_state()
        self._cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def replay(self) -> None:
        """Puts the generators back in that state: the next run draws what the first one drew."""
        torch.set_rng_state(self._cpu)
        if self._cuda is not None:
            torch.cuda.set_rng_state_all(self._cuda)
