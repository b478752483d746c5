"""U-Net candidates for this CPU, shared by ``speed/architectures.py`` (cost) and
``quality/quality_per_minute.py`` (quality): a name -> (preset, ``model`` overrides)."""


def _stem(channels: tuple[int, ...]) -> tuple[str, dict]:
    """The cpu preset with a 2x2 pixel-unshuffle stem, these widths, attention at the last level."""
    attention = (False,) * (len(channels) - 1) + (True,)
    return (
        "cpu",
        {
            "patch_size": 2,
            "block_out_channels": channels,
            "attention_levels": attention,
            "up_attention_levels": attention,
            "norm_groups": 8,
        },
    )


CANDIDATES = {
    "demo": ("demo", {}),
    "cpu": ("cpu", {}),
    # Twice the cpu preset's widths, attention at 7x7 as there.
    "wide16": ("cpu", {"block_out_channels": (16, 32, 64), "norm_groups": 8}),
    # Four times the cpu preset's widths, attention at 7x7 as there.
    "wide32": ("cpu", {"block_out_channels": (32, 64, 128), "norm_groups": 8}),
    # Wider still at the top, two levels of 64 below, no attention (labels by embedding).
    "wide_noattn": (
        "cpu",
        {
            "block_out_channels": (32, 64, 64),
            "attention_levels": (False, False, False),
            "up_attention_levels": (False, False, False),
            "mid_attention": False,
            "norm_groups": 8,
        },
    ),
    # Two levels (28x28 and 14x14), 64 channels at the bottom, attention in the middle only.
    "two_level": (
        "cpu",
        {
            "block_out_channels": (32, 64),
            "attention_levels": (False, False),
            "up_attention_levels": (False, False),
            "mid_attention": True,
            "norm_groups": 8,
        },
    ),
    # A 2x2 pixel-unshuffle stem: the U-Net runs at 14x14 and 7x7 on 4-channel patches, so that
    # 32 and 64 channels (which vectorise) cost what 8 and 16 do at full resolution.
    "stem32": _stem((32, 64)),
    # The stem with twice the widths.
    "stem64": _stem((64, 128)),
    # The stem with a third level (14x14, 7x7, 4x4).
    "stem3": _stem((32, 64, 128)),
}


def candidate(name: str) -> tuple[str, dict]:
    """(preset, ``model`` overrides) of the candidate called ``name``.

    Raises:
      ValueError: an unknown name (the valid ones listed).
    """
    if name not in CANDIDATES:
        raise ValueError(f"unknown candidate {name!r}; valid: {sorted(CANDIDATES)}")
    return CANDIDATES[name]
