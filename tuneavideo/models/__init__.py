from .unet import UNet3DConditionModel, UNet3DConditionOutput

__all__ = ["UNet3DConditionModel", "UNet3DConditionOutput"]
