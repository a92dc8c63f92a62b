"""ZeRO-3 aware loading: from_pretrained builds the model already partitioned under
deepspeed.zero.Init, so no rank ever holds the whole model; for training (train) and
ZeRO-3 inference (infer) alike."""

from __future__ import annotations

from typing import Any


class ZeroLoading:
    """What transformers' from_pretrained consults to build a model under deepspeed.zero.Init.

    transformers' own HfDeepSpeedConfig needs `accelerate`, which the image pins but an
    environment may lack; from_pretrained only asks the registered object is_zero3() and
    for .config (the dict it hands to zero.Init), so this stands in for it. Registered,
    from_pretrained creates every parameter already partitioned; rank 0 memory-maps the
    checkpoint and copies it in one module at a time (gather, copy, re-partition), and the
    other ranks read only its keys and shapes. No rank ever allocates the whole model.
    """

    def __init__(self, ds_config: dict[str, Any]):
        self.config = ds_config

    def is_zero3(self) -> bool:
        return True


def zero3_loading(ds_config: dict[str, Any]):
    """Register ZeRO-3 aware loading with transformers; keep the result alive while the
    model is loaded and in use."""
    from transformers.integrations import set_hf_deepspeed_config

    try:
        from transformers.integrations import HfDeepSpeedConfig

        return HfDeepSpeedConfig(ds_config)
    except ImportError:  # accelerate missing (PackageNotFoundError is an ImportError)
        keep = ZeroLoading(ds_config)
        # transformers holds only a weak reference; the caller keeps `keep` alive.
        set_hf_deepspeed_config(keep)
        return keep
