"""Data: the built-in synthetic corpus (`synthetic`) and its tokenizer (`tokenizer`), chat SFT
rendering, labels and packing (`sft`), jsonl files (`jsonl`) and the datamodule (`datamodule`)."""
