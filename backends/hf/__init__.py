"""A checkpoint in Hugging Face's layout, read without torch: its architecture
(`config.json`), its tokenizer and chat template, and its safetensors headers. Shared by the
`local` kind (which loads the weights) and the `vllm` kind (which only counts and plans)."""
