"""Data layer: the synthetic corpus and tokenizer, chat SFT rendering/packing, the datamodule."""
