"""Deployment estimates (roofline fit / latency / energy / control deadline per device profile) and the
calibration that measures this machine. See estimate.py (arXiv 2603.16952) and measure.py."""
from .estimate import (DecoderShape, DeviceProfile, Estimate, WeightBytes, builtin_profiles, decoder_shape,
                       estimate, estimate_dir, kv_cache_bytes, load_profile, weight_bytes, weight_bytes_from_dir,
                       weight_bytes_from_params)

__all__ = ["DecoderShape", "DeviceProfile", "Estimate", "WeightBytes", "builtin_profiles", "decoder_shape",
           "estimate", "estimate_dir", "kv_cache_bytes", "load_profile", "weight_bytes", "weight_bytes_from_dir",
           "weight_bytes_from_params"]
