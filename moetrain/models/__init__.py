"""Model parts: attention, router, experts, MoE block, decoder, Hugging Face conversion."""
