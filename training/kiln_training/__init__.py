"""Training Kiln's embedded default model: a small SDXL-architecture model drawing shapes.

`dataset` renders synthetic scenes (one coloured shape on a coloured background) with their
captions, `train` trains the VAE, both CLIP text encoders and the UNet from scratch and
writes a diffusers folder, and `evaluate` judges generated images from their pixels alone.
"""
