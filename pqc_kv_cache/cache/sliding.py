"""SlidingEncryptedLayer: a sliding-window (or chunked) attention layer's cache as ciphertext chunks."""

from __future__ import annotations

import functools

import torch

from .._checks import check_int
from .context import LayerContext
from .layer import EncryptedLayer, crop_count

__all__ = ["SlidingEncryptedLayer"]


@functools.cache
def recording_returns_window() -> bool:
    """Whether this transformers' DynamicSlidingWindowLayer, while recording the past, returns only the
    states its mask sizes announce (5.18 on) or every state kept since the last crop (5.16, 5.17).
    The layer returns what the installed release's layer returns; the answer comes from running it."""
    from transformers.cache_utils import DynamicSlidingWindowLayer
    layer = DynamicSlidingWindowLayer(sliding_window=2)
    layer.activate_past_recording()
    x = torch.zeros(1, 1, 3, 1)
    layer.update(x, x)
    k, _ = layer.update(x[:, :, :1], x[:, :, :1])
    return k.shape[-2] < 4


class SlidingEncryptedLayer(EncryptedLayer):
    """The same visible states and mask sizes as transformers' ``DynamicSlidingWindowLayer``.

    Whole segments that fall out of the window are dropped; a segment straddling the window start stays
    until it is wholly outside (its early positions are decrypted into the scratch but not returned).
    Merges build segments of at most a quarter window, so little is read beyond it."""

    is_sliding = True

    def __init__(self, context: LayerContext, layer_idx: int, sliding_window: int):
        self.sliding_window = check_int("sliding_window", sliding_window, 1)
        super().__init__(context, layer_idx)

    def _view_start(self) -> int:
        if self.record_past and recording_returns_window():
            return max(self._start, self._end - (self.sliding_window - 1))
        return self._start

    def _after_update(self) -> None:
        if not self.record_past:
            self._set_start(self._end - (self.sliding_window - 1))

    @property
    def _merge_cap(self) -> int:
        return max(1, self.sliding_window // 4)

    def get_seq_length(self) -> int:
        return self._end if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        w, cum = self.sliding_window, self._end
        kv_offset = max(cum - w + 1, 0)
        if cum >= w:
            return w - 1 + query_length, kv_offset
        return cum + query_length, kv_offset

    def get_max_length(self) -> int:
        return self.sliding_window

    def activate_past_recording(self, **kwargs) -> None:
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """As ``EncryptedLayer.crop``; past its window the layer also shrinks back to the window, and only
        while recording the past."""
        if not (self.is_initialized and self._end >= self.sliding_window):
            return super().crop(tokens_to_remove)
        t = crop_count(tokens_to_remove)
        if not self.record_past:
            raise ValueError("crop was called on a sliding-window layer past its window without past "
                             "recording; call activate_past_recording() before cropping")
        if t > 0:
            raise ValueError("a sliding-window layer past its window can only be cropped by a negative count")
        if t < 0:
            self._truncate(self._end + t)
        self._set_start(self._end - (self.sliding_window - 1))

    def _kind(self) -> str:
        return f"sliding_window={self.sliding_window}"
