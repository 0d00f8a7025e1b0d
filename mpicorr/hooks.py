"""Forward pre-hooks that feed each site's input to its layer's counts; removed when the block exits.

The sites are chosen before the run (models.find_sites); the hook itself does one call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from .counting import LayerCounts
from .models import Site


def _hook(counts: LayerCounts):
    def hook(module, args):
        counts.add(args[0])
    return hook


@contextmanager
def recording(sites: list[Site], counts: list[LayerCounts]) -> Iterator[None]:
    """While inside, every forward pass adds each site's input to the matching LayerCounts."""
    handles = []
    try:
        for site, layer_counts in zip(sites, counts, strict=True):
            handles.append(site.module.register_forward_pre_hook(_hook(layer_counts)))
        yield
    finally:
        for handle in handles:
            handle.remove()
