"""Reading and writing models: the official Kaggle Flax checkpoints (`kaggle`), GGUF (`gguf`),
Hugging Face directories and objects (`hf`), the tokenizer (`tokenizer`), downloads
(`hub`) and `from_pretrained` with its conversion cache (`pretrained`). Imports `core`,
`model` and `parallel`."""
