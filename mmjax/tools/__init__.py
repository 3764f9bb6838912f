"""Command-line tools: converters, AOT memory report, tokenizer training, the shapes oracle."""
