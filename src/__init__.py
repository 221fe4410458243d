"""Fast-dLLM v2 pipeline: AR LLM -> block-diffusion LLM, trained with Lightning, composed by Hydra."""
