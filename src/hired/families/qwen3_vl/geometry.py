"""Qwen3-VL's released processor settings; it resizes by Qwen2.5-VL's rule (:mod:`hired.families.qwen2_5_vl`)."""

# The released checkpoints' image processor (recalled from their preprocessor_config.json): 16 px
# patches merged 2x2, 65,536 to 16,777,216 pixels.
RELEASED = {"patch": 16, "merge": 2, "min_pixels": 65536, "max_pixels": 16777216}
