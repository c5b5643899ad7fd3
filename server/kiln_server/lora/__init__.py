"""Per-request LoRAs: reading LoRA files, resident adapter stacks, per-row UNet layers.

- `folders`: turns a requested LoRA name into a file of the configured folders, or refuses.
- `reading`: reads one LoRA file (diffusers/PEFT or kohya/A1111) into `LoraWeights`.
- `weights`: the normalised form every other part consumes.
- `stack`: the adapter slots resident for one model, with an LRU of adapters.
- `layers`: the per-row LoRA layers installed on a UNet, applying each row's adapter.
"""
