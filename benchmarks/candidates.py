"""U-Net candidates for this CPU, shared by ``architectures.py`` (cost) and
``quality_per_minute.py`` (quality): a name -> (preset, ``model`` overrides)."""

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
    "stem32": (
        "cpu",
        {
            "patch_size": 2,
            "block_out_channels": (32, 64),
            "attention_levels": (False, True),
            "up_attention_levels": (False, True),
            "norm_groups": 8,
        },
    ),
    # The stem with twice the widths.
    "stem64": (
        "cpu",
        {
            "patch_size": 2,
            "block_out_channels": (64, 128),
            "attention_levels": (False, True),
            "up_attention_levels": (False, True),
            "norm_groups": 8,
        },
    ),
    # The stem with a third level (14x14, 7x7, 4x4).
    "stem3": (
        "cpu",
        {
            "patch_size": 2,
            "block_out_channels": (32, 64, 128),
            "attention_levels": (False, False, True),
            "up_attention_levels": (False, False, True),
            "norm_groups": 8,
        },
    ),
}
