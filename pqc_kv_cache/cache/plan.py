"""Which layer class caches each layer of a model's config, in each residency mode.

One layer class per storage form, chosen through a table (a config's layer type -> class); a layer
type without a class is refused before any layer exists.
"""

from __future__ import annotations

from transformers.cache_utils import get_layer_types_and_kwargs

from .._checks import check_int
from .layer import EncryptedLayer
from .sliding import SlidingEncryptedLayer
from .workingset import SlidingWorkingSetLayer, WorkingSetLayer

__all__ = ["LAYER_TYPE_CLASSES", "WORKING_SET_LAYER_TYPE_CLASSES", "MODES", "layer_plan"]

#: A config's layer type -> the layer class that caches it (the sliding ones take the layer's window).
LAYER_TYPE_CLASSES: dict[str, type[EncryptedLayer]] = {
    "full_attention": EncryptedLayer,
    "sliding_attention": SlidingEncryptedLayer,
    "chunked_attention": SlidingEncryptedLayer,
}

#: The same table for the working-set mode: the same layers over a plaintext store (workingset.py).
WORKING_SET_LAYER_TYPE_CLASSES: dict[str, type[EncryptedLayer]] = {
    "full_attention": WorkingSetLayer,
    "sliding_attention": SlidingWorkingSetLayer,
    "chunked_attention": SlidingWorkingSetLayer,
}

#: Residency mode -> its layer-type table.
MODES: dict[str, dict[str, type[EncryptedLayer]]] = {
    "sealed": LAYER_TYPE_CLASSES,
    "working_set": WORKING_SET_LAYER_TYPE_CLASSES,
}


def layer_plan(config, classes: dict[str, type[EncryptedLayer]] = LAYER_TYPE_CLASSES
               ) -> list[tuple[type[EncryptedLayer], dict]]:
    """The class and init arguments of each cached layer of ``config``.

    transformers' ``get_layer_types_and_kwargs`` gives the layer types and their init kwargs: one dict
    shared by all layers up to 5.18, one dict per layer from 5.19. Any layer type not in
    ``LAYER_TYPE_CLASSES`` (linear attention, compressed, shared or dummy layers) is refused here, before
    any layer exists."""
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    layer_types = list(layer_types)
    if isinstance(layer_kwargs, dict):
        layer_kwargs = [layer_kwargs] * len(layer_types)
    if len(layer_kwargs) != len(layer_types) or not layer_types:
        raise ValueError(f"this config describes {len(layer_types)} cached layer(s) with {len(layer_kwargs)} "
                         "set(s) of layer arguments; EncryptedCache cannot lay out its layers")
    plan: list[tuple[type[EncryptedLayer], dict]] = []
    for i, (kind, kw) in enumerate(zip(layer_types, layer_kwargs)):
        cls = classes.get(kind)
        if cls is None:
            raise ValueError(f"layer {i} is {kind!r}: EncryptedCache supports full, sliding-window and chunked "
                             "attention layers only")
        if cls.is_sliding:
            w = kw.get("sliding_window")
            try:
                w = check_int("sliding window", w, 1)
            except (TypeError, ValueError):     # a model config's value, not a caller's argument: ValueError
                raise ValueError(f"layer {i} is {kind!r} with sliding window {w!r}; a positive int is needed") \
                    from None
            plan.append((cls, {"sliding_window": w}))
        else:
            plan.append((cls, {}))
    return plan
