"""Offline engine build: ONNX export, graph cleanup, validation, TensorRT builds, manifests.

`kiln build-engines` (cli.py) drives the stages in build.py; each stage module does one job.
"""
