"""Hooks that feed each site's tensor to its layer's counts; removed when the block exits.

The sites are chosen before the run (models.find_sites); the hook itself does one call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from .counting import LayerCounts, MoeCounts
from .models import Site


def _input_hook(site: Site, counts: LayerCounts | MoeCounts):
    def hook(module, args, kwargs):
        counts.add(site.neurons(*args, **kwargs))
    return hook


def _output_hook(site: Site, counts: LayerCounts):
    def hook(module, args, output):
        counts.add(site.neurons(output))
    return hook


@contextmanager
def recording(sites: list[Site], counts: list[LayerCounts | MoeCounts]) -> Iterator[None]:
    """While inside, every forward pass adds each site's tensor to the matching counts."""
    handles = []
    try:
        for site, layer_counts in zip(sites, counts, strict=True):
            if site.output:
                handles.append(site.module.register_forward_hook(_output_hook(site, layer_counts)))
            else:
                handles.append(site.module.register_forward_pre_hook(_input_hook(site, layer_counts),
                                                                     with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _first_input(receive):
    def hook(module, args, kwargs):
        receive(args[0] if args else next(iter(kwargs.values())))
    return hook


@contextmanager
def feeding(modules: list, receivers: list) -> Iterator[None]:
    """While inside, every forward pass gives each module's (first) input to the matching receiver: the MLP
    inputs that --dump records."""
    handles = []
    try:
        for module, receive in zip(modules, receivers, strict=True):
            handles.append(module.register_forward_pre_hook(_first_input(receive), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
