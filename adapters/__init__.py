"""Task adapters: CartPole (gymnasium) and Qwen2-VL (transformers); heavy imports stay inside each adapter."""
