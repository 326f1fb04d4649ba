"""The decoder itself: Llama-family math over the paged KV store, and checkpoint/GGUF loading."""
