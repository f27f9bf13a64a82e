"""Model inputs built without the hub: images plus text for vision-language models."""

from omnilens.inputs.vision import VisionInputs, image_processor_for, pixel_inputs, vision_inputs

__all__ = ["VisionInputs", "image_processor_for", "pixel_inputs", "vision_inputs"]
