"""The official StreamingT2V streaming model (ModelScope text-to-video-ms-1.7b base, CAM, APM).

Same vocabulary as the official fixtures' config.json: `unet` is a diffusers
UNet3DConditionModel config, `streaming` the CAM/APM options (empty: official values).
"""
import ml_collections

from st2v_jax.convert.official_configs import STREAMING_T2V


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(STREAMING_T2V)
