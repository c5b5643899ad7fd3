"""Per-request LoRAs: reading LoRA files, resident adapter stacks, per-row layers.

- `folders`: turns a requested LoRA name into a file of the configured folders, or refuses.
- `reading`: reads one LoRA file (diffusers/PEFT or kohya/A1111) into `LoraWeights`.
- `weights`: the normalised form every other part consumes.
- `stack`: the adapter slots resident for one model, with an LRU of adapters.
- `layers`: the per-row LoRA layers installed on a UNet and the text encoders (torch).
- `graph`, `graph_feed`: the same per-row formulation as graph inputs of an exported UNet
  (onnxruntime, TensorRT), and binding the stack's tensors to them.
- `serving`: making a loaded engine set serve LoRAs, whatever its backend.
- `library`: one model's LoRAs: files read off the engine thread, installed between steps.
- `listing`: what ListModels reports, from file headers only.
- `imports`: the server's cache of LoRAs imported through ModelAdminService.
- `policy`: which engines apply LoRAs, and the refusal for those that do not.
"""
