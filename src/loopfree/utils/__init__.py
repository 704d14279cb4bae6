"""Plumbing shared by every layer: exceptions, atomic outputs, safetensors state, seeds, devices, timing, images
and figures. Nothing here knows about diffusion."""
